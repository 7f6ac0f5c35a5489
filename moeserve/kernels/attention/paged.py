"""The paged KV cache as the attention kernels and their references read it.

A sequence's position p lives in cache slot `block_table[p // block_size] * block_size + p % block_size`;
the caches are [num_blocks, block_size, ...] tensors (MLA: one latent row [c_kv | k_pe] per slot; GQA:
K and V, each [num_blocks, block_size, Hk, D]). An FP8 cache holds E4M3 values of x / scale, with one fp32
scale per layer (a multiplier: x ~= value * scale), kept on the device as a 1-element tensor.
"""

import torch

from moeserve.quant.fp8 import to_e4m3

PAD_SLOT = -1  # slot_mapping entries of padded tokens: written nowhere


def context_slots(block_table_row: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """block_table_row [max_blocks] -> cache slots [length] (int64) of positions 0 .. length - 1."""
    positions = torch.arange(length, device=block_table_row.device)
    return block_table_row[positions // block_size].long() * block_size + positions % block_size


def padded_context_slots(block_table: torch.Tensor, seq_lens: torch.Tensor, max_len: int,
                         block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """block_table [B, max_blocks], seq_lens [B] -> (slots [B, max_len] int64, valid [B, max_len] bool).
    Positions past a sequence's length read slot 0 and are marked invalid."""
    positions = torch.arange(max_len, device=block_table.device)
    valid = positions[None, :] < seq_lens[:, None].long()
    blocks = block_table.long().gather(1, (positions // block_size).clamp(max=block_table.shape[1] - 1).expand(
        block_table.shape[0], -1))
    slots = blocks * block_size + positions % block_size
    return slots.masked_fill(~valid, 0), valid


def to_cache_dtype(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """What a cache of `cache_dtype` stores for x: x itself, or E4M3(x / scale) (saturating)."""
    if cache_dtype != torch.float8_e4m3fn:
        return x.to(cache_dtype)
    return to_e4m3(x.float() / scale.float())


def from_cache_dtype(stored: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """The values a cache entry stands for, in `dtype`."""
    if stored.dtype != torch.float8_e4m3fn:
        return stored.to(dtype)
    return (stored.float() * scale.float()).to(dtype)
