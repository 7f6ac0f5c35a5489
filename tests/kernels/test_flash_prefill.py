"""Varlen flash attention (MLA prefill) and the attention-state merge against their torch references (CPU:
Triton interpreter, with the wrappers' real 128 x 64 tiles)."""

import pytest
import torch

from moeserve.kernels.attention.flash_prefill import (
    flash_attention_varlen, flash_attention_varlen_reference, head_dim_parts, merge_attention_states)
from moeserve.layers.attention.dense import merge_attention
from tests.kernels.poison import poisoned_empty  # noqa: F401 (a fixture)


@pytest.fixture(autouse=True)
def poisoned(poisoned_empty):
    """Every test here runs with NaN-filled outputs and workspaces (tests/kernels/poison.py)."""


def cumulative(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)


def random_inputs(lengths, num_heads, num_kv_heads, dqk, dv, dtype=torch.float32, seed=0):
    """q [Tq, H, Dqk], k [Tk, Hk, Dqk], v [Tk, Hk, Dv], cu_q, cu_k for lengths [(Lq, Lk), ...]."""
    generator = torch.Generator().manual_seed(seed)
    q_total, k_total = sum(lq for lq, _ in lengths), sum(lk for _, lk in lengths)
    q = torch.randn(q_total, num_heads, dqk, generator=generator).to(dtype)
    k = torch.randn(k_total, num_kv_heads, dqk, generator=generator).to(dtype)
    v = torch.randn(k_total, num_kv_heads, dv, generator=generator).to(dtype)
    return q, k, v, cumulative([lq for lq, _ in lengths]), cumulative([lk for _, lk in lengths])


def assert_matches_reference(q, k, v, cu_q, cu_k, causal, atol=1e-5, rtol=1e-5):
    max_q = int((cu_q[1:] - cu_q[:-1]).max())
    scale = q.shape[-1] ** -0.5
    out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, scale, causal)
    ref_out, ref_lse = flash_attention_varlen_reference(q, k, v, cu_q, cu_k, scale, causal)
    assert torch.isfinite(out).all() and not lse.isnan().any()
    assert torch.equal(lse.isinf(), ref_lse.isinf())  # exactly the queries without keys
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=rtol)
    return out, lse


# (Lq, Lk): one query; self-attention over 2 query tiles; a cached prefix (Lk > Lq) with diagonal tiles
# starting mid key tile; key tiles below every query's diagonal (unmasked) and crossing it; the last
# query of a full tile seeing exactly one key of the next key tile (Lk - Lq = 65)
CAUSAL_LENGTHS = [(1, 1), (150, 150), (10, 100), (5, 5), (130, 195)]
# no keys at all; more keys than queries; one query over a whole key tile; fewer keys than queries
NON_CAUSAL_LENGTHS = [(3, 0), (70, 130), (1, 64), (20, 5), (150, 150)]


@pytest.mark.parametrize("dims", [(48, 32), (32, 32)], ids=["dqk48=32+16", "dqk32"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["G1", "G2"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
def test_varlen_matches_the_reference(dims, heads, causal):
    lengths = CAUSAL_LENGTHS if causal else NON_CAUSAL_LENGTHS
    assert_matches_reference(*random_inputs(lengths, *heads, *dims), causal)


def test_a_sequence_without_keys_gets_zeros_and_minus_infinity():
    q, k, v, cu_q, cu_k = random_inputs([(4, 9), (3, 0), (2, 5)], 2, 2, 48, 32)
    out, lse = assert_matches_reference(q, k, v, cu_q, cu_k, causal=False)
    assert (out[4:7] == 0).all() and (lse[:, 4:7] == float("-inf")).all()
    assert torch.isfinite(lse[:, :4]).all() and torch.isfinite(lse[:, 7:]).all()


def test_strided_views_as_mla_passes_them():
    """q in a transposed buffer; k and v slices of one kv_b_proj-like output row [k | v]."""
    lengths = [(70, 130), (3, 3)]
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(4, 73, 64, generator=generator).transpose(0, 1)[:, :, 8:56]  # [Tq, H, 48]
    kv = torch.randn(133, 2, 48 + 32, generator=generator)
    k, v = kv[..., :48], kv[..., 48:]
    cu_q, cu_k = cumulative([lq for lq, _ in lengths]), cumulative([lk for _, lk in lengths])
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    for causal in (True, False):
        assert_matches_reference(q, k, v, cu_q, cu_k, causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
def test_bf16(causal):
    q, k, v, cu_q, cu_k = random_inputs(CAUSAL_LENGTHS, 4, 2, 48, 32, torch.bfloat16)
    out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, 150, 48**-0.5, causal)
    ref_out, ref_lse = flash_attention_varlen_reference(q, k, v, cu_q, cu_k, 48**-0.5, causal)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    # bf16 probabilities times bf16 values; the interpreter truncates each fp32 -> bf16 cast (about 0.4%)
    assert ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item() < 2e-2
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lengths", [[], [(0, 0), (0, 4)]], ids=["B=0", "Tq=0"])
def test_no_queries(lengths):
    q, k, v, cu_q, cu_k = random_inputs(lengths, 4, 2, 48, 32)
    out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, 0, 1.0, causal=False)
    assert out.shape == (0, 4, 32) and lse.shape == (4, 0)


def test_prefill_over_a_cached_prefix_merged_chunk_by_chunk():
    """MLA's prefill: new tokens over themselves (causal, cu_q == cu_k), then over the cached prefix in two
    chunks (non-causal), merged by LSE: the same as causal attention over the whole context."""
    new, prefix, chunks = [37, 1], [100, 64], [(60, 40), (64, 0)]  # per sequence: prefix rows of each chunk
    generator = torch.Generator().manual_seed(5)
    context = [p + n for p, n in zip(prefix, new)]
    q = torch.randn(sum(new), 4, 48, generator=generator)
    k = torch.randn(sum(context), 4, 48, generator=generator)
    v = torch.randn(sum(context), 4, 32, generator=generator)
    starts = [0, context[0]]
    new_rows = torch.cat([torch.arange(s + p, s + p + n) for s, p, n in zip(starts, prefix, new)])
    cu_new = cumulative(new)
    out, lse = flash_attention_varlen(q, k[new_rows], v[new_rows], cu_new, cu_new, max(new), 0.2, causal=True)
    offsets = [0, 0]
    for chunk in zip(*chunks):
        rows = torch.cat([torch.arange(s + o, s + o + c) for s, o, c in zip(starts, offsets, chunk)])
        offsets = [o + c for o, c in zip(offsets, chunk)]
        chunk_out, chunk_lse = flash_attention_varlen(q, k[rows], v[rows], cu_new, cumulative(list(chunk)), max(new),
                                                      0.2, causal=False)
        out, lse = merge_attention_states(out, lse, chunk_out, chunk_lse)
    ref_out, ref_lse = flash_attention_varlen_reference(q, k, v, cu_new, cumulative(context), 0.2, causal=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_merge_matches_dense_merge_including_empty_sides():
    generator = torch.Generator().manual_seed(7)
    out_a, out_b = torch.randn(2, 5, 20, 32, generator=generator)
    lse_a, lse_b = torch.randn(2, 20, 5, generator=generator) * 4
    lse_a[3, 1] = lse_b[7, 2] = float("-inf")  # one side saw no key
    lse_a[17, 4] = lse_b[17, 4] = float("-inf")  # neither did
    out_a[1, 3] = out_b[2, 7] = out_a[4, 17] = out_b[4, 17] = 0.0  # as a kernel leaves such rows
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = merge_attention(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-5)
    assert (out[4, 17] == 0).all() and lse[17, 4] == float("-inf") and torch.isfinite(out).all()


def test_head_dim_parts():
    assert head_dim_parts(192) == (128, 64) and head_dim_parts(48) == (32, 16) and head_dim_parts(128) == (128, 0)
    for unsupported in (100, 24, 8):
        with pytest.raises(ValueError):
            head_dim_parts(unsupported)
