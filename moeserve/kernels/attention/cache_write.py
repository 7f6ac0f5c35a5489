"""Writing this step's keys (or MLA latents) into the paged cache through the slot mapping.

One program per token stores its two [heads, width] parts (MLA: c_kv and k_pe into the two column
ranges of the latent row; GQA: K into the key cache and V into the value cache) at its slot; a token
whose slot is PAD_SLOT (padding under CUDA graphs) writes nothing. An FP8 cache stores E4M3(x / scale),
saturating. References: the same through paged.to_cache_dtype and an indexed assignment.
"""

import torch
import triton
import triton.language as tl

from moeserve.kernels.activation import round_to_e4m3_grid
from moeserve.kernels.attention.paged import PAD_SLOT, to_cache_dtype
from moeserve.quant.fp8 import E4M3_MAX

SATURATION = tl.constexpr(E4M3_MAX)


@triton.jit
def _store_token(src_ptr, stride_st, stride_sh, dst_ptr, stride_db, stride_do, stride_dh, token, block, offset,
                 keep, scale, heads, width, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, FP8: tl.constexpr):
    """src[token] [heads, width] -> dst[block, offset] [heads, width]: stores only where `keep`."""
    h = tl.arange(0, BLOCK_H)[:, None]
    w = tl.arange(0, BLOCK_W)[None, :]
    ok = (h < heads) & (w < width) & keep
    x = tl.load(src_ptr + token * stride_st + h * stride_sh + w, mask=ok, other=0.0)
    if FP8:
        x = tl.math.div_rn(x.to(tl.float32), scale)  # correctly rounded, as torch divides
        x = round_to_e4m3_grid(tl.minimum(tl.maximum(x, -SATURATION), SATURATION))
    tl.store(dst_ptr + block * stride_db + offset * stride_do + h * stride_dh + w, x.to(dst_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _cache_write_kernel(slot_mapping_ptr, scale_ptr, block_size, heads,
                        a_ptr, stride_at, stride_ah, a_cache_ptr, stride_acb, stride_aco, stride_ach, width_a,
                        b_ptr, stride_bt, stride_bh, b_cache_ptr, stride_bcb, stride_bco, stride_bch, width_b,
                        BLOCK_H: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, FP8: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    keep = slot >= 0
    slot = tl.maximum(slot, 0)  # a padded token's addresses stay in bounds (its stores are masked)
    block, offset = slot // block_size, slot % block_size
    scale = tl.load(scale_ptr) if FP8 else 1.0
    _store_token(a_ptr, stride_at, stride_ah, a_cache_ptr, stride_acb, stride_aco, stride_ach, token, block, offset,
                 keep, scale, heads, width_a, BLOCK_H, BLOCK_A, FP8)
    _store_token(b_ptr, stride_bt, stride_bh, b_cache_ptr, stride_bcb, stride_bco, stride_bch, token, block, offset,
                 keep, scale, heads, width_b, BLOCK_H, BLOCK_B, FP8)


def _write_pair(a, a_cache, b, b_cache, slot_mapping, kv_scale):
    """a, b [T, heads, width_a | width_b] -> a_cache, b_cache [num_blocks, block_size, heads, width_a | width_b]."""
    tokens, heads = a.shape[:2]
    if tokens == 0:
        return
    assert a.stride(-1) == b.stride(-1) == a_cache.stride(-1) == b_cache.stride(-1) == 1
    fp8 = a_cache.dtype == torch.float8_e4m3fn
    assert not fp8 or kv_scale is not None, "an FP8 cache needs kv_scale"
    _cache_write_kernel[(tokens,)](
        slot_mapping, kv_scale if fp8 else slot_mapping, a_cache.shape[1], heads,
        a, *a.stride()[:2], a_cache, *a_cache.stride()[:3], a.shape[2],
        b, *b.stride()[:2], b_cache, *b_cache.stride()[:3], b.shape[2],
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_A=triton.next_power_of_2(a.shape[2]),
        BLOCK_B=triton.next_power_of_2(b.shape[2]), FP8=fp8)


def write_mla_cache(cache: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, slot_mapping: torch.Tensor,
                    kv_scale: torch.Tensor | None = None) -> None:
    """cache [num_blocks, block_size, L + R] row slot_mapping[t] <- [c_kv[t] | k_pe[t]] (c_kv [T, L], k_pe [T, R];
    slot_mapping [T] int32/int64, PAD_SLOT writes nowhere). FP8 cache: E4M3(x / kv_scale), kv_scale fp32 [1]."""
    rank = c_kv.shape[-1]
    _write_pair(c_kv.unsqueeze(1), cache[..., :rank].unsqueeze(2), k_pe.unsqueeze(1), cache[..., rank:].unsqueeze(2),
                slot_mapping, kv_scale)


def write_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slot_mapping: torch.Tensor, kv_scale: torch.Tensor | None = None) -> None:
    """k_cache, v_cache [num_blocks, block_size, Hk, D] at slot_mapping[t] <- k[t], v[t] ([T, Hk, D])."""
    _write_pair(k, k_cache, v, v_cache, slot_mapping, kv_scale)


def _write_slots_reference(cache: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor, kv_scale):
    """cache [num_blocks, block_size, ...] <- values [T, ...] at the slots that are not PAD_SLOT."""
    keep = slot_mapping != PAD_SLOT
    slots = slot_mapping[keep].long()
    block_size = cache.shape[1]
    cache[slots // block_size, slots % block_size] = to_cache_dtype(values[keep], cache.dtype, kv_scale)


def write_mla_cache_reference(cache, c_kv, k_pe, slot_mapping, kv_scale=None) -> None:
    _write_slots_reference(cache, torch.cat((c_kv, k_pe), dim=-1), slot_mapping, kv_scale)


def write_kv_cache_reference(k_cache, v_cache, k, v, slot_mapping, kv_scale=None) -> None:
    _write_slots_reference(k_cache, k, slot_mapping, kv_scale)
    _write_slots_reference(v_cache, v, slot_mapping, kv_scale)
