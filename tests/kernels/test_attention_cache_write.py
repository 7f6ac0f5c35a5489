"""Paged cache writes (Triton, CPU interpreter) against their torch references, bit for bit."""

import pytest
import torch

from moeserve.kernels.attention.cache_write import (write_kv_cache, write_kv_cache_reference, write_mla_cache,
                                                    write_mla_cache_reference)
from moeserve.kernels.attention.paged import PAD_SLOT

NUM_BLOCKS = 7
SENTINEL = 0x5A  # every byte of the cache before the write: a slot nobody writes keeps it

# (source dtype, cache dtype): 16-bit and fp32 caches store what they are given (a copy, or an exact
# upcast); FP8 caches store E4M3(x / scale)
DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32),
          (torch.bfloat16, torch.float32), (torch.bfloat16, torch.float8_e4m3fn), (torch.float32, torch.float8_e4m3fn)]
DTYPE_IDS = ["bf16", "fp16", "fp32", "bf16-into-fp32", "bf16-into-fp8", "fp32-into-fp8"]


def sentinel_cache(shape, dtype) -> torch.Tensor:
    cache = torch.empty(shape, dtype=dtype)
    cache.view(torch.uint8).fill_(SENTINEL)
    return cache


def scattered_slots(tokens: int, block_size: int, index_dtype, generator) -> torch.Tensor:
    """Distinct random slots from the whole pool, every third token padded."""
    slots = torch.randperm(NUM_BLOCKS * block_size, generator=generator)[:tokens]
    slots[::3] = PAD_SLOT
    return slots.to(index_dtype)


def kv_scale_for(cache_dtype):
    # |x| / 0.01 reaches past 448 for randn * 3: some values saturate
    return torch.tensor([0.01]) if cache_dtype == torch.float8_e4m3fn else None


def assert_same_bytes(actual: torch.Tensor, expected: torch.Tensor):
    assert torch.equal(actual.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8))


def assert_written_rows(cache_rows: torch.Tensor, slots: torch.Tensor):
    """cache_rows [slots, ...]: the rows at non-pad slots were written, every other row kept the sentinel."""
    untouched = (cache_rows.contiguous().view(torch.uint8).flatten(1) == SENTINEL).all(dim=1)
    written = torch.zeros_like(untouched)
    written[slots[slots != PAD_SLOT].long()] = True
    assert torch.equal(untouched, ~written)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("src_dtype, cache_dtype", DTYPES, ids=DTYPE_IDS)
def test_mla_cache_write_matches_the_reference(src_dtype, cache_dtype, block_size, index_dtype):
    generator = torch.Generator().manual_seed(block_size)
    rank, rope, tokens = 32, 16, 6
    projected = (torch.randn(tokens, rank + rope + 8, generator=generator) * 3).to(src_dtype)
    c_kv, k_pe = projected[:, :rank], projected[:, rank : rank + rope]  # views with row stride 56
    slots = scattered_slots(tokens, block_size, index_dtype, generator)
    kv_scale = kv_scale_for(cache_dtype)
    cache = sentinel_cache((NUM_BLOCKS, block_size, rank + rope), cache_dtype)
    expected = cache.clone()
    write_mla_cache(cache, c_kv, k_pe, slots, kv_scale)
    write_mla_cache_reference(expected, c_kv, k_pe, slots, kv_scale)
    assert_same_bytes(cache, expected)
    assert_written_rows(cache.flatten(0, 1), slots)


@pytest.mark.parametrize("heads, head_dim", [(2, 16), (3, 24)], ids=["2x16", "3x24-padded"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("src_dtype, cache_dtype", DTYPES, ids=DTYPE_IDS)
def test_kv_cache_write_matches_the_reference(src_dtype, cache_dtype, block_size, heads, head_dim):
    generator = torch.Generator().manual_seed(block_size)
    tokens, q_heads = 6, 2 * heads
    qkv = (torch.randn(tokens, (q_heads + 2 * heads) * head_dim, generator=generator) * 3).to(src_dtype)
    k, v = qkv.unflatten(-1, (-1, head_dim))[:, q_heads:].chunk(2, dim=1)  # non-contiguous [T, Hk, D] views
    slots = scattered_slots(tokens, block_size, torch.int64, generator)
    kv_scale = kv_scale_for(cache_dtype)
    pool = sentinel_cache((NUM_BLOCKS, 2, block_size, heads, head_dim), cache_dtype)
    k_cache, v_cache = pool[:, 0], pool[:, 1]  # strided views: K and V of a block side by side
    expected = pool.clone()
    write_kv_cache(k_cache, v_cache, k, v, slots, kv_scale)
    write_kv_cache_reference(expected[:, 0], expected[:, 1], k, v, slots, kv_scale)
    assert_same_bytes(pool, expected)
    assert_written_rows(k_cache.flatten(0, 1), slots)
    assert_written_rows(v_cache.flatten(0, 1), slots)


def test_fp8_cache_write_saturates_and_rounds_like_torch():
    values = torch.tensor([[-1000.0, -448.0, -0.3, 1e-5, 0.0107, 447.9, 449.0, 5000.0]]).repeat(1, 6)  # [1, 48]
    cache = sentinel_cache((1, 1, 48), torch.float8_e4m3fn)
    write_mla_cache(cache, values[:, :32], values[:, 32:], torch.tensor([0]), torch.tensor([0.5]))
    expected = (values / 0.5).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert_same_bytes(cache[0], expected)
    assert cache.float().abs().max() == 448


def test_no_tokens_writes_nothing():
    cache = sentinel_cache((NUM_BLOCKS, 4, 48), torch.bfloat16)
    write_mla_cache(cache, torch.empty(0, 32, dtype=torch.bfloat16), torch.empty(0, 16, dtype=torch.bfloat16),
                    torch.empty(0, dtype=torch.int64))
    k_cache = sentinel_cache((NUM_BLOCKS, 4, 2, 16), torch.float8_e4m3fn)
    v_cache = sentinel_cache((NUM_BLOCKS, 4, 2, 16), torch.float8_e4m3fn)
    empty = torch.empty(0, 2, 16)
    write_kv_cache(k_cache, v_cache, empty, empty, torch.empty(0, dtype=torch.int32), torch.tensor([1.0]))
    for untouched in (cache, k_cache, v_cache):
        assert (untouched.view(torch.uint8) == SENTINEL).all()
