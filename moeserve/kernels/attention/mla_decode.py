"""MLA decode in the absorbed form: MQA of all query heads over the latent cache rows [c_kv | k_pe].

out[b, h] = softmax(scale * q[b, h] . key) @ c_kv over the positions < seq_lens[b] of sequence b, where
key = the whole row [c_kv | k_pe] and value = c_kv (the output is still in the latent: W_UV comes later).
Split-KV flash decoding: stage 1 gives each (head tile, sequence, split) program a contiguous range of
whole BLOCK_N tiles; it reads each tile once for both products (scores over its two parts, L and R,
as two dots; output over the c_kv part) for BLOCK_H heads at a time, with an online softmax in fp32,
and writes a normalized partial output and its log-sum-exp. Stage 2 merges the splits by log-sum-exp.
With one split stage 1 writes the output itself. Reference: mla_decode_reference (torch, fp32).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeserve.kernels.attention.paged import context_slots, from_cache_dtype
from moeserve.kernels.device import multiprocessors

LOG2E = 1.4426950408889634  # the kernel's softmax runs in base 2
LN2 = tl.constexpr(0.6931471805599453)
MERGE_SPLITS = 8  # splits stage 2 reads per step
MAX_SPLITS = 128
FP8_AS_FP16 = True  # FP8 caches: products in fp16 (E4M3 converts to it exactly, in one instruction) or q's dtype
ALIGNED_TILES = True  # tiles that fit in a cache block read one block id (else one per row)
MIN_SPLIT_TILES = 2  # a split shorter than this spends more on its prologue and merge than it saves
WAVES = 4  # programs per SM the split count aims for (the fastest of 1, 2, 4, 8 on the H200 with aligned tiles)


@dataclass(frozen=True)
class MLADecodeConfig:
    block_h: int  # query heads per program (>= 16: both products run on tensor cores)
    block_n: int  # cache rows per step
    num_warps: int
    num_stages: int


def mla_decode_config(num_heads: int, dtype: torch.dtype) -> MLADecodeConfig:
    """Tiles for `num_heads` query heads over a cache of `dtype` (float32: fp32 queries, whose dots run
    on FMA units), from scripts/attention_sass_mla.py under Triton 3.6 and 3.7 for sm_90: no spills,
    shared memory within Hopper's 227 KiB. Up to 32 heads mma.sync (HMMA, M < 64), 64 heads wgmma."""
    if dtype == torch.float32:
        return MLADecodeConfig(block_h=16, block_n=16, num_warps=4, num_stages=2)
    if num_heads <= 16:  # memory-bound; fastest of 18 variants on the H200 (scripts/attention_variants.py)
        return MLADecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=2)
    if num_heads <= 32:
        return MLADecodeConfig(block_h=32, block_n=64, num_warps=8, num_stages=3)
    # compute-bound: [64, 512] fp32 accumulators over 8 warps; fastest of 16 variants on the H200
    return MLADecodeConfig(block_h=64, block_n=32, num_warps=8, num_stages=1 if dtype == torch.float8_e4m3fn else 2)


def mla_decode_num_splits(batch_size: int, num_heads: int, max_context_len: int, device: torch.device) -> int:
    """Splits per sequence that fill the GPU (about WAVES programs per SM) without splits shorter than
    MIN_SPLIT_TILES tiles of the longest context. Depends only on its arguments (a fixed number per
    captured batch size); 1 when the batch alone fills the GPU."""
    config = mla_decode_config(num_heads, torch.bfloat16)
    programs_per_split = max(batch_size, 1) * triton.cdiv(num_heads, config.block_h)
    wanted = WAVES * multiprocessors(torch.device(device)) // programs_per_split
    longest = triton.cdiv(max_context_len, MIN_SPLIT_TILES * config.block_n)
    return max(1, min(wanted, longest, MAX_SPLITS))


@triton.jit(do_not_specialize=["stride_table", "stride_ob", "stride_oh", "stride_os", "stride_lb", "stride_lh"])  # these vary from step to step
def _mla_decode_split_kernel(
    q_ptr, q_pe_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, kv_scale_ptr, out_ptr, lse_ptr,
    num_heads, qk_scale, block_size,
    stride_qb, stride_qh, stride_pe_b, stride_pe_h, stride_cache_block, stride_cache_offset, stride_table,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    L: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    FP8: tl.constexpr, WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8_AS_FP16: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    seq = tl.program_id(1).to(tl.int64)
    split, num_splits = tl.program_id(2), tl.num_programs(2)
    heads = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads[:, None] < num_heads
    latent, rope = tl.arange(0, L), L + tl.arange(0, R)

    q_nope = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + latent[None, :], mask=head_ok,
                     other=0.0)  # [BLOCK_H, L]
    q_pe = tl.load(q_pe_ptr + seq * stride_pe_b + heads[:, None] * stride_pe_h + tl.arange(0, R)[None, :],
                   mask=head_ok, other=0.0)  # [BLOCK_H, R]
    if FP8:
        kv_scale = tl.load(kv_scale_ptr)
        qk_scale *= kv_scale
        if FP8_AS_FP16:  # E4M3 -> fp16 is one conversion; the products then run in fp16
            q_nope, q_pe = q_nope.to(tl.float16), q_pe.to(tl.float16)

    seq_len = tl.load(seq_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    row_max = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of the log2-scaled scores
    row_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, L], tl.float32)
    for first in range(start, end, BLOCK_N):
        positions = first + tl.arange(0, BLOCK_N)
        valid = positions < end
        if ALIGNED:  # the tile lies in one cache block: one block id, consecutive rows
            block = tl.load(block_table_ptr + seq * stride_table + first // block_size).to(tl.int64)
            rows = cache_ptr + block * stride_cache_block + (positions % block_size) * stride_cache_offset
        else:
            blocks = tl.load(block_table_ptr + seq * stride_table + positions // block_size, mask=valid, other=0)
            rows = cache_ptr + blocks.to(tl.int64) * stride_cache_block + (positions % block_size) * stride_cache_offset
        c_kv = tl.load(rows[:, None] + latent[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, L]
        k_pe = tl.load(rows[:, None] + rope[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, R]
        c_kv, k_pe = c_kv.to(q_nope.dtype), k_pe.to(q_nope.dtype)

        scores = tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PRECISION)  # the small dot first: fewer
        scores = tl.dot(q_nope, tl.trans(c_kv), scores, input_precision=DOT_PRECISION)  # registers live (FP8)
        scores = tl.where(valid[None, :], scores * qk_scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))  # finite: every tile holds a valid position
        correction = tl.exp2(row_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(probs, axis=1)
        acc = tl.dot(probs.to(c_kv.dtype), c_kv, acc * correction[:, None], input_precision=DOT_PRECISION)
        row_max = new_max

    # row_sum >= 1 once a key is seen (the maximum contributes 2^0); without keys acc is 0, so out is 0
    row_sum_or_one = tl.maximum(row_sum, 1.0)
    normalizer = 1.0 / row_sum_or_one
    if FP8:
        normalizer *= kv_scale
    out = acc * normalizer[:, None]
    out_rows = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os
    tl.store(out_rows + latent[None, :], out.to(out_ptr.dtype.element_ty), mask=head_ok)
    if WRITE_LSE:
        lse = tl.where(row_sum > 0, (row_max + tl.log2(row_sum_or_one)) * LN2, float("-inf"))  # empty: -inf
        tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=heads < num_heads)


@triton.jit(do_not_specialize=["num_splits", "stride_pb", "stride_ph", "stride_lb", "stride_lh"])  # these vary from step to step
def _mla_decode_merge_kernel(partial_ptr, lse_ptr, out_ptr, seq_lens_ptr, num_splits,
                             stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
                             L: tl.constexpr, BLOCK_S: tl.constexpr, MERGE_STEP: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    seq, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    tiles = tl.cdiv(tl.load(seq_lens_ptr + seq), BLOCK_N)  # the splits stage 1 gave keys: as it counts them
    used_splits = tl.cdiv(tiles, tl.maximum(tl.cdiv(tiles, num_splits), 1))
    lse_row = lse_ptr + seq * stride_lb + head * stride_lh
    splits = tl.arange(0, BLOCK_S)
    lse_max = tl.max(tl.load(lse_row + splits, mask=splits < num_splits, other=float("-inf")), axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # no split has keys: every weight is 0
    latent = tl.arange(0, L)
    partial_row = partial_ptr + seq * stride_pb + head * stride_ph
    acc = tl.zeros([L], tl.float32)
    weight_sums = tl.zeros([MERGE_STEP], tl.float32)
    for first in range(0, used_splits, MERGE_STEP):  # a short context leaves most splits empty
        step = first + tl.arange(0, MERGE_STEP)
        lse = tl.load(lse_row + step, mask=step < num_splits, other=float("-inf"))
        weights = tl.exp(lse - lse_max)
        has_keys = (step < num_splits) & (lse > float("-inf"))  # splits past the context are never read
        partial = tl.load(partial_row + step[:, None] * stride_ps + latent[None, :], mask=has_keys[:, None],
                          other=0.0)  # [MERGE_STEP, L]
        acc += tl.sum(weights[:, None] * partial, axis=0)
        weight_sums += weights
    out = acc / tl.maximum(tl.sum(weight_sums, axis=0), 1.0)  # >= 1 if a split has keys (the max weighs 1)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + latent, out.to(out_ptr.dtype.element_ty))


def mla_decode(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
               scale: float, num_splits: int, kv_lora_rank: int, kv_scale: torch.Tensor | None = None,
               out: torch.Tensor | None = None, config: MLADecodeConfig | None = None,
               q_pe: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, L + R] (bf16/fp16/fp32; L = kv_lora_rank), or q [B, H, L] with its rope part q_pe [B, H, R]
    apart (no concatenation), cache [num_blocks, block_size, L + R] (bf16/fp16/
    fp32/FP8 with kv_scale fp32 [1]), block_table int32 [B, max_blocks], seq_lens int32 [B] -> out [B, H, L]
    in q's dtype (written into `out` if given). num_splits: from mla_decode_num_splits, fixed per batch size;
    config: mla_decode_config's unless given. No host sync: capturable in a CUDA graph."""
    rank = kv_lora_rank
    if q_pe is None:
        q, q_pe = q[..., :rank], q[..., rank:]
    batch, num_heads, rope = q_pe.shape
    out = q.new_empty(batch, num_heads, rank) if out is None else out
    if batch == 0:
        return out
    assert q.stride(-1) == q_pe.stride(-1) == cache.stride(-1) == out.stride(-1) == block_table.stride(-1) == 1
    assert q.shape[-1] == rank and cache.shape[-1] == rank + rope
    assert rank == triton.next_power_of_2(rank) and rope == triton.next_power_of_2(rope)
    fp8 = cache.dtype == torch.float8_e4m3fn
    assert not fp8 or kv_scale is not None, "an FP8 cache needs kv_scale"
    assert 1 <= num_splits <= MAX_SPLITS, f"num_splits must be 1..{MAX_SPLITS} (the merge's tile), got {num_splits}"
    config = config or mla_decode_config(num_heads, torch.float32 if q.dtype == torch.float32 else cache.dtype)
    if num_splits == 1:
        partial, lse = out.unsqueeze(2), out  # stage 1 writes the output (no lse)
    else:
        partial = torch.empty(batch, num_heads, num_splits, rank, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    # the head tiles of one range of one sequence run side by side: the tiles after the first read its KV from L2
    grid = (triton.cdiv(num_heads, config.block_h), batch, num_splits)
    _mla_decode_split_kernel[grid](
        q, q_pe, cache, block_table, seq_lens, kv_scale if fp8 else seq_lens, partial, lse,
        num_heads, scale * LOG2E, cache.shape[1],
        q.stride(0), q.stride(1), q_pe.stride(0), q_pe.stride(1), cache.stride(0), cache.stride(1), block_table.stride(0),
        *partial.stride()[:3], *lse.stride()[:2],
        L=rank, R=rope, BLOCK_H=config.block_h, BLOCK_N=config.block_n, FP8=fp8, WRITE_LSE=num_splits > 1,
        FP8_AS_FP16=FP8_AS_FP16 and q.dtype != torch.float32,  # fp32 models keep fp32 products
        ALIGNED=ALIGNED_TILES and cache.shape[1] % config.block_n == 0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 models stay fp32 (no TF32)
        num_warps=config.num_warps, num_stages=config.num_stages)
    if num_splits > 1:
        _mla_decode_merge_kernel[(batch, num_heads)](
            partial, lse, out, seq_lens, num_splits, *partial.stride()[:3], *lse.stride()[:2], *out.stride()[:2],
            L=rank, BLOCK_S=MAX_SPLITS, MERGE_STEP=MERGE_SPLITS, BLOCK_N=config.block_n)  # one variant for all
    return out


def mla_decode_reference(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                         scale: float, kv_lora_rank: int, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """What mla_decode computes, one sequence at a time in fp32 (a seq_len 0 row gives 0)."""
    rows = cache.flatten(0, 1)  # [slots, L + R]
    out = torch.zeros(*q.shape[:2], kv_lora_rank, dtype=torch.float32, device=q.device)
    for b, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        latent = from_cache_dtype(rows[context_slots(block_table[b], length, cache.shape[1])], torch.float32,
                                  kv_scale)  # [S, L + R]
        probs = torch.softmax(q[b].float() @ latent.T * scale, dim=-1)  # [H, S]
        out[b] = probs @ latent[:, :kv_lora_rank]
    return out.to(q.dtype)
