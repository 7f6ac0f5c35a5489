"""MLA decode over the paged latent cache (Triton, CPU interpreter) against its torch reference."""

import pytest
import torch

from moeserve.kernels.attention import mla_decode as decode
from moeserve.kernels.attention.mla_decode import (MLADecodeConfig, mla_decode, mla_decode_config,
                                                   mla_decode_num_splits, mla_decode_reference)
from moeserve.kernels.attention.paged import to_cache_dtype

TEST_TILES = MLADecodeConfig(block_h=16, block_n=16, num_warps=4, num_stages=1)  # several tiles per sequence
LENGTHS = [1, 16, 17, 31, 64, 45]  # one row, block and tile boundaries, non-multiples: all different
KV_SCALE = torch.tensor([0.05])


def paged_latents(lengths, block_size, width, cache_dtype, generator, kv_scale=None):
    """A cache pool with twice the blocks needed, each sequence's blocks scattered through it, and the
    block table as a column slice of a wider persistent table (its row stride exceeds max_blocks).
    Table entries past a sequence's blocks point far outside the pool: reading one would fault."""
    needed = [-(-n // block_size) for n in lengths]
    num_blocks = 2 * sum(needed) + 1
    max_blocks = max(needed + [1])
    table = torch.full((len(lengths), max_blocks + 3), 10**6, dtype=torch.int32)
    order = torch.randperm(num_blocks, generator=generator)
    first = 0
    for b, count in enumerate(needed):
        table[b, :count] = order[first : first + count]
        first += count
    latents = torch.randn(num_blocks, block_size, width, generator=generator)
    return to_cache_dtype(latents, cache_dtype, kv_scale), table[:, :max_blocks]


def assert_decode_matches(lengths, heads, rank, rope, block_size, num_splits, q_dtype=torch.float32,
                          cache_dtype=torch.float32, tolerance=1e-5, config=TEST_TILES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    kv_scale = KV_SCALE if cache_dtype == torch.float8_e4m3fn else None
    cache, table = paged_latents(lengths, block_size, rank + rope, cache_dtype, generator, kv_scale)
    q = torch.randn(len(lengths), heads, rank + rope, generator=generator).to(q_dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    scale = (rank + rope) ** -0.5 * 2  # scores with a standard deviation near 2: a peaked softmax, not a flat one
    buffer = torch.full((len(lengths), heads, rank + 8), float("nan"), dtype=q_dtype)  # poisoned, wider than out
    out = mla_decode(q, cache, table, seq_lens, scale, num_splits, rank, kv_scale, out=buffer[..., :rank],
                     config=config)
    expected = mla_decode_reference(q, cache, table, seq_lens, scale, rank, kv_scale)
    assert out.data_ptr() == buffer.data_ptr() and out.dtype == q_dtype
    assert torch.isfinite(out).all() and buffer[..., rank:].isnan().all()  # every output written, nothing else
    torch.testing.assert_close(out.float(), expected.float(), rtol=tolerance, atol=tolerance)
    return out


@pytest.mark.parametrize("num_splits", [1, 3, 8, 20])  # 8, 20: more splits than tiles; 20 > one merge step
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("heads", [4, 20])  # padded to one, or two, tiles of 16 heads
@pytest.mark.parametrize("rank, rope", [(32, 16), (64, 16)])
def test_decode_matches_the_reference(rank, rope, heads, block_size, num_splits):
    assert_decode_matches(LENGTHS, heads, rank, rope, block_size, num_splits)


# fp32 dots in the interpreter are exact to fp32 rounding (FP8 converts exactly to fp32 and bf16: tight
# too). 16-bit queries: the probabilities and the output are rounded to 16 bits (bf16: 2^-8 relative
# each; the interpreter truncates instead of rounding, which doubles it and biases it), hence 2e-2
@pytest.mark.parametrize("num_splits", [12, 40])  # many used splits (more than one merge step), and unused ones
def test_long_contexts_over_many_splits(num_splits):
    assert_decode_matches([300, 5, 0, 161], 4, 32, 16, 16, num_splits)


@pytest.mark.parametrize("q_dtype, cache_dtype, tolerance", [
    (torch.float32, torch.float8_e4m3fn, 1e-5),
    (torch.bfloat16, torch.bfloat16, 2e-2),
    (torch.float16, torch.float16, 5e-3),
    (torch.bfloat16, torch.float8_e4m3fn, 2e-2),
    (torch.bfloat16, torch.float32, 2e-2),
], ids=["fp32-fp8", "bf16-bf16", "fp16-fp16", "bf16-fp8", "bf16-fp32"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_cache_and_query_dtypes(q_dtype, cache_dtype, tolerance, num_splits):
    assert_decode_matches(LENGTHS, 4, 32, 16, 4, num_splits, q_dtype, cache_dtype, tolerance)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("heads, q_dtype, cache_dtype, tolerance", [
    (4, torch.float32, torch.float32, 1e-5),  # FMA tiles
    (4, torch.bfloat16, torch.bfloat16, 2e-2),  # 16 heads per program
    (128, torch.bfloat16, torch.float8_e4m3fn, 2e-2),  # 64 heads per program, 16-row FP8 tiles
], ids=["fp32", "bf16", "128-heads-fp8"])
def test_default_tiles_and_empty_rows(heads, q_dtype, cache_dtype, tolerance, num_splits):
    """mla_decode_config's tiles; rows of length 0 (padding in a captured batch) give 0 and leave their
    neighbours alone."""
    out = assert_decode_matches([0, 37, 0, 5], heads, 32, 16, 16, num_splits, q_dtype, cache_dtype, tolerance,
                                config=None)
    assert (out[[0, 2]] == 0).all()


def test_empty_batch():
    q = torch.randn(0, 4, 48)
    cache = torch.randn(3, 4, 48)
    out = mla_decode(q, cache, torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), 0.1, 3, 32)
    assert out.shape == (0, 4, 32)


def test_num_splits_fill_the_gpu_without_short_splits(monkeypatch):
    monkeypatch.setattr(decode, "multiprocessors", lambda device: 132)
    splits = lambda batch, heads, context: mla_decode_num_splits(batch, heads, context, torch.device("cuda"))
    assert splits(32, 16, 4096) == 16  # 512 programs: four per SM
    assert splits(128, 128, 4096) == 2  # 2 head tiles x 128 sequences x 2 splits: four per SM
    assert splits(1, 16, 100) == 2  # one short sequence: no split shorter than two 32-row tiles
    assert splits(1, 16, 4096) == 64
    assert splits(1, 16, 1 << 20) == decode.MAX_SPLITS
    assert splits(0, 16, 4096) == splits(1, 16, 4096)  # an empty batch still gets a valid count


@pytest.mark.parametrize("heads", [1, 4, 16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float32])
def test_configs_keep_every_dot_dimension_at_least_16(heads, dtype):
    config = mla_decode_config(heads, dtype)
    assert config.block_h >= 16 and config.block_n >= 16
    assert mla_decode_num_splits(4, heads, 1000, torch.device("cpu")) >= 1


def test_the_rope_part_may_come_apart_from_the_latent_query():
    """The decode path passes W_UK-absorbed latents and the rope part as two tensors (no concatenation)."""
    lengths, rank, rope, heads = [5, 40, 17], 32, 16, 4
    generator = torch.Generator().manual_seed(3)
    cache, table = paged_latents(lengths, 4, rank + rope, torch.float32, generator, None)
    q = torch.randn(len(lengths), heads, rank + rope, generator=generator)
    q_latent = torch.randn(heads, len(lengths), rank, generator=generator).transpose(0, 1)  # strided, as an einsum gives
    q_latent.copy_(q[..., :rank])
    q_pe = q[..., rank:].clone()
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    out = mla_decode(q_latent, cache, table, seq_lens, 0.3, 3, rank, config=TEST_TILES, q_pe=q_pe)
    expected = mla_decode_reference(q, cache, table, seq_lens, 0.3, rank)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
