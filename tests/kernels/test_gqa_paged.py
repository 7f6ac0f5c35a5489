"""GQA attention over the paged KV cache (prefill chunks and split-KV decode) against the torch references
(CPU: Triton interpreter, with the wrappers' real tiles: 64 keys, up to 128 (query, head) rows)."""

import pytest
import torch

from moeserve.kernels.attention import gqa_paged
from moeserve.kernels.attention.gqa_paged import (
    MAX_SPLITS, paged_decode, paged_decode_num_splits, paged_decode_reference, paged_prefill, paged_prefill_reference)
from moeserve.kernels.attention.paged import to_cache_dtype
from tests.kernels.poison import poisoned_empty  # noqa: F401 (a fixture)
from tests.kernels.test_flash_prefill import cumulative, poisoned  # noqa: F401 (an autouse fixture)

HEAD_DIM = 32
GROUPS = {"G1": (2, 2), "G2": (4, 2), "G5": (10, 2)}  # (Hq, Hk)
MASKS = {  # (sliding_window, chunk_size); the contexts below reach 150 positions
    "causal": (None, None),
    "window24": (24, None),
    "window1000": (1000, None),  # larger than every context
    "chunk32": (None, 32),  # chunk boundaries inside the longer query ranges
}
# a mixed step: decodes (qlen 1, one of them the first token), a fresh prefill, prefill chunks over cached
# prefixes (one with 70 queries: several row tiles, key tiles both unmasked and masked), a block-boundary length
QUERY_LENS = [1, 20, 17, 70, 1, 5]
CONTEXT_LENS = [1, 20, 90, 150, 37, 64]
# decode contexts, all different: one position, a block / tile boundary and one past it, a padding row
DECODE_CONTEXT_LENS = [1, 16, 64, 65, 0, 150, 37]


def scattered_cache(context_lens, block_size, num_kv_heads, cache_dtype=torch.float32, kv_scale=None, seed=0):
    """K and V caches (views into one [blocks, block_size, 2, Hk, D] pool, larger than needed, of random values),
    and a block table that is a row slice of a wider table; each sequence's blocks are drawn from a random
    permutation of the pool, and the unused entries point at random blocks."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-length // block_size) for length in context_lens]
    pool = sum(blocks_per_seq) + 7
    width = max(blocks_per_seq, default=0) + 2
    table = torch.randint(0, pool, (len(context_lens) + 2, width + 3), dtype=torch.int32, generator=generator)
    order = torch.randperm(pool, generator=generator).to(torch.int32)
    for b, count in enumerate(blocks_per_seq):
        table[b + 1, :count], order = order[:count], order[count:]
    values = torch.randn(pool, block_size, 2, num_kv_heads, HEAD_DIM, generator=generator)
    cache = to_cache_dtype(values, cache_dtype, kv_scale)
    return cache[:, :, 0], cache[:, :, 1], table[1 : len(context_lens) + 1, :width]


def random_queries(num_tokens, num_heads, dtype=torch.float32, seed=1):
    """[T, Hq, D], a view that skips a head of a wider buffer (strided, not contiguous)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, num_heads + 1, HEAD_DIM, generator=generator).to(dtype)[:, 1:]


def run_prefill(block_size, heads, mask, cache_dtype=torch.float32, q_dtype=torch.float32, kv_scale=None):
    num_heads, num_kv_heads = heads
    k_cache, v_cache, table = scattered_cache(CONTEXT_LENS, block_size, num_kv_heads, cache_dtype, kv_scale)
    q = random_queries(sum(QUERY_LENS), num_heads, q_dtype)
    query_start, seq_lens = cumulative(QUERY_LENS), torch.tensor(CONTEXT_LENS, dtype=torch.int32)
    window, chunk = mask
    out = paged_prefill(q, k_cache, v_cache, table, query_start, seq_lens, max(QUERY_LENS), HEAD_DIM**-0.5,
                        window, chunk, kv_scale)
    expected = paged_prefill_reference(q, k_cache, v_cache, table, query_start, seq_lens, HEAD_DIM**-0.5,
                                       window, chunk, kv_scale)
    assert out.dtype == q_dtype and torch.isfinite(out.float()).all()
    return out.float(), expected.float()


def run_decode(block_size, heads, mask, num_splits, cache_dtype=torch.float32, q_dtype=torch.float32, kv_scale=None):
    num_heads, num_kv_heads = heads
    k_cache, v_cache, table = scattered_cache(DECODE_CONTEXT_LENS, block_size, num_kv_heads, cache_dtype, kv_scale)
    q = random_queries(len(DECODE_CONTEXT_LENS), num_heads, q_dtype)
    seq_lens = torch.tensor(DECODE_CONTEXT_LENS, dtype=torch.int32)
    out = torch.full(q.shape, float("nan"), dtype=q_dtype)
    window, chunk = mask
    returned = paged_decode(q, k_cache, v_cache, table, seq_lens, HEAD_DIM**-0.5, num_splits, window, chunk,
                            kv_scale, out=out)
    expected = paged_decode_reference(q, k_cache, v_cache, table, seq_lens, HEAD_DIM**-0.5, window, chunk, kv_scale)
    assert returned is out and torch.isfinite(out.float()).all()
    assert (out[DECODE_CONTEXT_LENS.index(0)] == 0).all()  # the padding row
    return out.float(), expected.float()


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("heads", GROUPS.values(), ids=GROUPS.keys())
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_prefill_matches_the_reference(block_size, heads, mask):
    torch.testing.assert_close(*run_prefill(block_size, heads, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("num_splits", [1, 2, 5])  # 2: tiles shared unevenly; 5: more splits than tiles (3)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_matches_the_reference(block_size, num_splits, mask):
    torch.testing.assert_close(*run_decode(block_size, GROUPS["G2"], mask, num_splits), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [GROUPS["G1"], GROUPS["G5"]], ids=["G1", "G5"])
def test_decode_other_group_sizes(heads):
    torch.testing.assert_close(*run_decode(4, heads, MASKS["window24"], 3), atol=1e-5, rtol=1e-5)


FP8_SCALE = torch.tensor([0.02])  # randn / 0.02 stays well inside E4M3's +-448


@pytest.mark.parametrize("mask", [MASKS["causal"], MASKS["chunk32"]], ids=["causal", "chunk32"])
def test_fp8_cache(mask):
    """fp32 queries: the converted keys and values are exact, so only the scale's use is under test."""
    fp8 = dict(cache_dtype=torch.float8_e4m3fn, kv_scale=FP8_SCALE)
    torch.testing.assert_close(*run_prefill(4, GROUPS["G2"], mask, **fp8), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(*run_decode(4, GROUPS["G2"], mask, 3, **fp8), atol=1e-5, rtol=1e-5)


def assert_bf16_close(actual, expected):
    # bf16 probabilities times bf16 values; the interpreter truncates each fp32 -> bf16 cast (about 0.4%)
    assert ((actual - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_bf16_queries(cache_dtype):
    dtypes = dict(cache_dtype=cache_dtype, q_dtype=torch.bfloat16, kv_scale=FP8_SCALE)
    assert_bf16_close(*run_prefill(16, GROUPS["G2"], MASKS["window24"], **dtypes))
    assert_bf16_close(*run_decode(16, GROUPS["G2"], MASKS["window24"], 3, **dtypes))


def test_empty_batches():
    k_cache, v_cache, table = scattered_cache([], 4, 2)
    empty_lens = torch.zeros(0, dtype=torch.int32)
    q = random_queries(0, 4)
    assert paged_decode(q, k_cache, v_cache, table, empty_lens, 1.0, 2).shape == (0, 4, HEAD_DIM)
    assert paged_prefill(q, k_cache, v_cache, table, cumulative([]), empty_lens, 0, 1.0).shape == (0, 4, HEAD_DIM)
    k_cache, v_cache, table = scattered_cache([5, 3], 4, 2)  # T = 0 with B = 2: no query this step
    out = paged_prefill(q, k_cache, v_cache, table, cumulative([0, 0]), torch.tensor([5, 3], dtype=torch.int32), 0, 1.0)
    assert out.shape == (0, 4, HEAD_DIM)


def test_num_splits_fill_two_waves_without_short_splits(monkeypatch):
    monkeypatch.setattr(gqa_paged, "multiprocessors", lambda device: 132)
    assert paged_decode_num_splits(1, 4, 32768, "cuda") == MAX_SPLITS  # 66 wanted
    assert paged_decode_num_splits(64, 4, 32768, "cuda") == 2  # 256 programs: 264 / 256 rounded up
    assert paged_decode_num_splits(128, 4, 32768, "cuda") == 1
    assert paged_decode_num_splits(1, 4, 1024, "cuda") == 8  # splits of two 64-key tiles
    assert paged_decode_num_splits(1, 4, 100, "cuda") == 1
    assert paged_decode_num_splits(0, 4, 32768, "cuda") == MAX_SPLITS  # an empty batch still gets a valid count


def test_num_splits_on_the_cpu_are_small_and_deterministic():
    counts = {paged_decode_num_splits(1, 2, 4096, torch.device("cpu")) for _ in range(3)}
    assert counts == {2}


def test_decode_rejects_too_many_splits():
    k_cache, v_cache, table = scattered_cache([5], 4, 2)
    with pytest.raises(ValueError):
        paged_decode(random_queries(1, 4), k_cache, v_cache, table, torch.tensor([5], dtype=torch.int32), 1.0,
                     MAX_SPLITS + 1)
