"""The paged attention kernels on a GPU at real shapes (DeepSeek-V2-Lite and V3 MLA with 16 and 128 heads,
Qwen3-30B-A3B and Mixtral GQA), against their torch references on fresh random inputs, outputs poisoned
first; and the engine with the Triton backend against the torch one on CUDA."""

import pytest
import torch

from moeserve.kernels.attention.cache_write import (write_kv_cache, write_kv_cache_reference, write_mla_cache,
                                                    write_mla_cache_reference)
from moeserve.kernels.attention.flash_prefill import flash_attention_varlen, flash_attention_varlen_reference
from moeserve.kernels.attention.gqa_paged import (paged_decode, paged_decode_num_splits, paged_decode_reference,
                                                  paged_prefill, paged_prefill_reference)
from moeserve.kernels.attention.mla_decode import mla_decode, mla_decode_num_splits, mla_decode_reference
from moeserve.llm import LLM
from moeserve.loader import presets
from moeserve.sampling_params import SamplingParams
from tests.kernels.poison import poisoned_empty  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CONTEXTS = [1, 100, 1000, 4097]  # one token, mid-block, a block boundary + 1, beyond 4 K
L, R = 512, 64


@pytest.fixture(autouse=True)
def poisoned(poisoned_empty):
    """Every kernel output and workspace starts as NaN (tests/kernels/poison.py): anything unwritten fails."""


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def scattered_pool(contexts, block_size, row_shape, dtype):
    blocks = [-(-c // block_size) for c in contexts]
    pool = torch.randn(2 * sum(blocks), block_size, *row_shape, device="cuda").to(dtype)  # twice what is used
    ids = torch.randperm(pool.shape[0], device="cuda")[: sum(blocks)].int()
    table = torch.zeros(len(contexts), max(blocks) + 3, dtype=torch.int32, device="cuda")  # wider than needed
    for b, row in enumerate(ids.split(blocks)):
        table[b, : row.numel()] = row
    return pool, table, torch.tensor(contexts, dtype=torch.int32, device="cuda")


def cache_scale(fp8: bool):
    return torch.tensor([0.05], device="cuda") if fp8 else None


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("heads", [16, 128])
def test_mla_decode(heads, block_size, fp8):
    cache, table, seq_lens = scattered_pool(CONTEXTS, block_size, (L + R,),
                                            torch.float8_e4m3fn if fp8 else torch.bfloat16)
    q = torch.randn(len(CONTEXTS), heads, L + R, device="cuda", dtype=torch.bfloat16)
    splits = mla_decode_num_splits(len(CONTEXTS), heads, max(CONTEXTS), q.device)
    for num_splits in (1, splits):
        out = mla_decode(q, cache, table, seq_lens, 0.07, num_splits, L, cache_scale(fp8))
        ref = mla_decode_reference(q.float(), cache, table, seq_lens, 0.07, L, cache_scale(fp8))
        assert relative_error(out, ref) < 1e-2, num_splits


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("heads,kv_heads,window", [(32, 4, None), (32, 8, None), (32, 8, 700), (40, 8, None)])
def test_gqa_paged_decode_and_prefill(heads, kv_heads, window, fp8):
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    k_cache, table, seq_lens = scattered_pool(CONTEXTS, 16, (kv_heads, 128), dtype)
    v_cache = torch.randn(k_cache.shape, device="cuda").to(dtype)
    q = torch.randn(len(CONTEXTS), heads, 128, device="cuda", dtype=torch.bfloat16)
    splits = paged_decode_num_splits(len(CONTEXTS), kv_heads, max(CONTEXTS), q.device)
    out = paged_decode(q, k_cache, v_cache, table, seq_lens, 0.09, splits, window, None, cache_scale(fp8))
    ref = paged_decode_reference(q, k_cache, v_cache, table, seq_lens, 0.09, window, None, cache_scale(fp8))
    assert relative_error(out, ref) < 1e-2
    query_lens = [1, 37, 300, 129]  # the last tokens of each context, a decode among them
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(query_lens), heads, 128, device="cuda", dtype=torch.bfloat16)
    out = paged_prefill(q, k_cache, v_cache, table, starts, seq_lens, max(query_lens), 0.09, window, None,
                        cache_scale(fp8))
    ref = paged_prefill_reference(q, k_cache, v_cache, table, starts, seq_lens, 0.09, window, None, cache_scale(fp8))
    assert relative_error(out, ref) < 1e-2


def test_gqa_chunked_attention_llama4():
    k_cache, table, seq_lens = scattered_pool(CONTEXTS, 16, (8, 128), torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(len(CONTEXTS), 40, 128, device="cuda", dtype=torch.bfloat16)
    out = paged_decode(q, k_cache, v_cache, table, seq_lens, 0.09, 8, None, 1024)
    ref = paged_decode_reference(q, k_cache, v_cache, table, seq_lens, 0.09, None, 1024)
    assert relative_error(out, ref) < 1e-2


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [16, 128])
def test_mla_prefill_flash_varlen(heads, causal):
    query_lens, key_lens = [1, 200, 1031], [1, 200, 1031] if causal else [0, 77, 2048]
    cu_q = torch.tensor([0, 1, 201, 1232], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + torch.tensor(key_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(query_lens), heads, 192, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(key_lens), heads, 192, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(sum(key_lens), heads, 128, device="cuda", dtype=torch.bfloat16)
    out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, max(query_lens), 192**-0.5, causal)
    ref_out, ref_lse = flash_attention_varlen_reference(q, k, v, cu_q, cu_k, 192**-0.5, causal)
    seen = torch.isfinite(ref_lse)
    assert relative_error(out, ref_out) < 1e-2 and (torch.isfinite(lse) == seen).all()
    assert (lse[seen] - ref_lse[seen]).abs().max() < 1e-2


@pytest.mark.parametrize("fp8", [False, True])
def test_cache_writes_exact(fp8):
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    slots = torch.randperm(4096, device="cuda")[:300]
    slots[::7] = -1  # padded tokens write nowhere
    cache = torch.randn(256, 16, L + R, device="cuda").to(dtype)
    expected = cache.clone()
    c_kv, k_pe = torch.randn(300, L, device="cuda"), torch.randn(300, R, device="cuda")
    write_mla_cache(cache, c_kv.bfloat16(), k_pe.bfloat16(), slots, cache_scale(fp8))
    write_mla_cache_reference(expected, c_kv.bfloat16(), k_pe.bfloat16(), slots, cache_scale(fp8))
    assert torch.equal(cache.float(), expected.float())  # every value (an underflow may be +0 for torch's -0)
    kv = torch.randn(2, 256, 16, 8, 128, device="cuda").to(dtype)
    kv_expected = kv.clone()
    k, v = torch.randn(2, 300, 8, 128, device="cuda", dtype=torch.bfloat16)
    write_kv_cache(kv[0], kv[1], k, v, slots, cache_scale(fp8))
    write_kv_cache_reference(kv_expected[0], kv_expected[1], k, v, slots, cache_scale(fp8))
    assert torch.equal(kv.float(), kv_expected.float())


SHARED = list(range(5, 45))
PROMPTS = [{"prompt_token_ids": SHARED + list(range(50, 50 + n))} for n in (1, 13, 60)] + [
    {"prompt_token_ids": list(range(7, 10))}]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("preset", sorted(presets.TINY_PRESETS))
def test_engine_triton_backend_equals_torch_backend_on_cuda(preset, kv_cache_dtype):
    """Chunked prefill over cached prefixes (a shared prompt prefix), decodes mixed in; fp32 models."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    options = dict(device="cuda", max_num_batched_tokens=24, block_size=16, kv_cache_dtype=kv_cache_dtype,
                   kv_cache_memory=2**26)
    results = {}
    for backend in ("torch", "triton"):
        llm = LLM(preset, attention_backend=backend, **options)
        first = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:1], params)]  # caches the shared prefix
        results[backend] = first + [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
        assert llm.engine.block_manager.prefix_hits > 0
        del llm
    assert results["triton"] == results["torch"]
