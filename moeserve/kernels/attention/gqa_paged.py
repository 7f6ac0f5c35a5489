"""GQA attention over the paged KV cache (Qwen3-MoE, Mixtral, Llama 4): prefill chunks with cached
prefixes (mixed with single-token queries), and split-KV flash decoding. References:
`paged_prefill_reference`, `paged_decode_reference` (per sequence, through moeserve.layers.attention.dense).

Query i of sequence b sits at position seq_lens[b] - qlen_b + i and sees the cached keys p <= its
position, optionally only p > position - sliding_window (Mistral) and only p in its chunk of
chunk_size positions (Llama 4). The G = Hq / Hk query heads of a KV head share a tile's rows, so each
K/V tile is read once per group. Key tiles no query of a tile sees are skipped; those every query of
the tile sees wholly are processed without masks. An FP8 cache is converted to the queries' dtype
after loading, its scale applied to the scores and the output.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeserve.kernels.attention.flash_prefill import LOG2E, SCORE_FLOOR, _load_rows, _normalize, _online_softmax
from moeserve.kernels.attention.paged import context_slots, from_cache_dtype
from moeserve.kernels.device import multiprocessors
from moeserve.layers.attention.dense import attention_with_lse, causal_mask

FP8_AS_FP16 = True  # FP8 caches: products in fp16 (E4M3 converts to it exactly, in one instruction) or q's dtype
MAX_SPLITS = 64  # the decode merge holds every split of a row in one tile
SMALL_MERGE_TILE = 16
DECODE_BLOCK_N = 64
MIN_TILES_PER_SPLIT = 2


@triton.jit
def _first_key(pos, sliding_window, chunk_size, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """The lowest key position a query at position pos sees (0 for pos < 0, which sees none)."""
    first = pos * 0
    if HAS_WINDOW:
        first = tl.maximum(first, pos - sliding_window + 1)
    if HAS_CHUNK:
        first = tl.maximum(first, pos // chunk_size * chunk_size)
    return first


@triton.jit
def _useful_tiles(first_pos, last_pos, sliding_window, chunk_size,
                  BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """Key tiles [lo, hi) that some query at positions first_pos..last_pos sees."""
    first_key = _first_key(first_pos, sliding_window, chunk_size, HAS_WINDOW, HAS_CHUNK)
    return first_key // BLOCK_N, tl.cdiv(last_pos + 1, BLOCK_N)


@triton.jit
def _attend_paged_tiles(acc, m_i, l_i, q, query_pos, row_first_key, k_base, v_base, block_row_ptr, seq_len,
                        tile_lo, tile_hi, skip_lo, skip_hi, qk_scale, stride_kb, stride_ks, stride_kd,
                        stride_vb, stride_vs, stride_vd, BLOCK_N: tl.constexpr, D: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Key tiles tile_lo .. tile_hi - 1 except skip_lo .. skip_hi - 1. MASKED: each query at query_pos [M]
    sees the keys row_first_key [M] .. query_pos; otherwise all keys of every tile."""
    for i in tl.range(0, tile_hi - tile_lo - (skip_hi - skip_lo)):
        tile = tile_lo + i
        tile += tl.where(tile >= skip_lo, skip_hi - skip_lo, 0)
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = offs_n < seq_len
        if MASKED:
            block = tl.load(block_row_ptr + offs_n // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        else:
            block = tl.load(block_row_ptr + offs_n // BLOCK_SIZE).to(tl.int64)
        within = offs_n % BLOCK_SIZE
        k = _load_rows(k_base, block * stride_kb + within * stride_ks, stride_kd, D, key_ok, MASKED)  # [N, D]
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * qk_scale
        if MASKED:
            allowed = (offs_n[None, :] >= row_first_key[:, None]) & (offs_n[None, :] <= query_pos[:, None])
            scores = tl.where(allowed, scores, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(scores, m_i, l_i)
        v = _load_rows(v_base, block * stride_vb + within * stride_vs, stride_vd, D, key_ok, MASKED)  # [N, D]
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attend_paged(q, query_pos, first_pos, last_pos, tile_lo, tile_hi, k_base, v_base, block_row_ptr, seq_len,
                  kv_scale_ptr, qk_scale, sliding_window, chunk_size,
                  stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr, FP8: tl.constexpr, PRECISION: tl.constexpr,
                  FP8_AS_FP16: tl.constexpr):
    """Queries q [M, D] at query_pos [M] (all within first_pos..last_pos) over key tiles [tile_lo, tile_hi)
    -> (out [M, D], lse [M] in log2 units). FP8: keys and values are scaled by kv_scale."""
    if FP8:
        kv_scale = tl.load(kv_scale_ptr)
        qk_scale = qk_scale * kv_scale
        if FP8_AS_FP16:  # E4M3 -> fp16 is one conversion; the products then run in fp16
            q = q.to(tl.float16)
    # the tiles every query sees whole: from the last query's first key up to the first query's position
    full_lo = tl.cdiv(_first_key(last_pos, sliding_window, chunk_size, HAS_WINDOW, HAS_CHUNK), BLOCK_N)
    full_lo = tl.minimum(tl.maximum(full_lo, tile_lo), tile_hi)
    full_hi = tl.minimum(tl.maximum((first_pos + 1) // BLOCK_N, full_lo), tile_hi)
    row_first_key = _first_key(query_pos, sliding_window, chunk_size, HAS_WINDOW, HAS_CHUNK)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), SCORE_FLOOR, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend_paged_tiles(acc, m_i, l_i, q, query_pos, row_first_key, k_base, v_base, block_row_ptr,
                                        seq_len, full_lo, full_hi, full_hi, full_hi, qk_scale,
                                        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                                        BLOCK_N, D, BLOCK_SIZE, False, PRECISION)
    acc, m_i, l_i = _attend_paged_tiles(acc, m_i, l_i, q, query_pos, row_first_key, k_base, v_base, block_row_ptr,
                                        seq_len, tile_lo, tile_hi, full_lo, full_hi, qk_scale,
                                        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                                        BLOCK_N, D, BLOCK_SIZE, True, PRECISION)
    out, lse = _normalize(acc, m_i, l_i)
    if FP8:
        out = out * kv_scale
    return out, lse


@triton.jit(do_not_specialize=["stride_bt"])  # these vary from step to step
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_table_ptr, query_start_ptr, seq_lens_ptr, kv_scale_ptr,
    qk_scale, sliding_window, chunk_size, group_size,
    stride_qt, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh,
    stride_vd, stride_ot, stride_oh, stride_bt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr, FP8: tl.constexpr, PRECISION: tl.constexpr,
    FP8_AS_FP16: tl.constexpr,
):
    """Program (tile of rows, KV head, sequence). Row r of a sequence is query r // G, query head
    kv_head * G + r % G: the tile's rows are (query, head of the group) pairs, queries outermost."""
    tile, kv_head, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    num_rows = q_len * group_size
    r0 = tile * BLOCK_M
    if r0 >= num_rows:
        return
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    query = rows // group_size
    heads = kv_head * group_size + rows % group_size
    q_offsets = (q_start + query).to(tl.int64) * stride_qt + heads * stride_qh
    q = _load_rows(q_ptr, q_offsets, stride_qd, D, row_ok, True)  # [M, D]
    context_start = seq_len - q_len
    first_pos = context_start + r0 // group_size
    last_pos = context_start + (tl.minimum(r0 + BLOCK_M, num_rows) - 1) // group_size
    tile_lo, tile_hi = _useful_tiles(first_pos, last_pos, sliding_window, chunk_size, BLOCK_N, HAS_WINDOW, HAS_CHUNK)
    out, _ = _attend_paged(q, context_start + query, first_pos, last_pos, tile_lo, tile_hi,
                           k_cache_ptr + kv_head * stride_kh, v_cache_ptr + kv_head * stride_vh,
                           block_table_ptr + seq.to(tl.int64) * stride_bt, seq_len, kv_scale_ptr, qk_scale,
                           sliding_window, chunk_size, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                           BLOCK_M, BLOCK_N, D, BLOCK_SIZE, HAS_WINDOW, HAS_CHUNK, FP8, PRECISION, FP8_AS_FP16)
    out_offsets = (q_start + query).to(tl.int64) * stride_ot + heads * stride_oh
    tl.store(out_ptr + out_offsets[:, None] + tl.arange(0, D)[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_splits", "stride_bt", "stride_pb", "stride_ph", "stride_lb", "stride_lh"])  # these vary from step to step
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, part_out_ptr, part_lse_ptr, block_table_ptr, seq_lens_ptr, kv_scale_ptr,
    qk_scale, sliding_window, chunk_size, group_size, num_splits,
    stride_qb, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh,
    stride_vd, stride_bt, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr, FP8: tl.constexpr, PRECISION: tl.constexpr,
    FP8_AS_FP16: tl.constexpr,
):
    """Stage 1, program (sequence, KV head, split): the G query heads (rows padded to BLOCK_H) over the
    split's share of whole key tiles -> normalized partial out [G, D] and its lse (log2 units)."""
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    pos = seq_len - 1
    offs_h = tl.arange(0, BLOCK_H)
    head_ok = offs_h < group_size
    heads = kv_head * group_size + offs_h
    q = _load_rows(q_ptr, seq.to(tl.int64) * stride_qb + heads * stride_qh, stride_qd, D, head_ok, True)  # [H, D]
    tile_lo, tile_hi = _useful_tiles(pos, pos, sliding_window, chunk_size, BLOCK_N, HAS_WINDOW, HAS_CHUNK)
    per_split = tl.cdiv(tile_hi - tile_lo, num_splits)
    split_lo = tl.minimum(tile_lo + split * per_split, tile_hi)
    split_hi = tl.minimum(split_lo + per_split, tile_hi)
    out, lse = _attend_paged(q, pos + offs_h * 0, pos, pos, split_lo, split_hi,
                             k_cache_ptr + kv_head * stride_kh, v_cache_ptr + kv_head * stride_vh,
                             block_table_ptr + seq.to(tl.int64) * stride_bt, seq_len, kv_scale_ptr, qk_scale,
                             sliding_window, chunk_size, stride_kb, stride_ks, stride_kd,
                             stride_vb, stride_vs, stride_vd,
                             BLOCK_H, BLOCK_N, D, BLOCK_SIZE, HAS_WINDOW, HAS_CHUNK, FP8, PRECISION, FP8_AS_FP16)
    part = seq.to(tl.int64) * stride_pb + heads * stride_ph + split * stride_ps
    tl.store(part_out_ptr + part[:, None] + tl.arange(0, D)[None, :], out, mask=head_ok[:, None])
    tl.store(part_lse_ptr + seq.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=head_ok)


@triton.jit(do_not_specialize=["num_splits", "stride_pb", "stride_ph", "stride_lb", "stride_lh"])  # these vary from step to step
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_splits,
                         stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
                         SPLITS: tl.constexpr, D: tl.constexpr):
    """Stage 2, program (sequence, query head): the LSE-weighted mean of the splits' partial outputs."""
    seq, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    splits = tl.arange(0, SPLITS)
    split_ok = splits < num_splits
    lse = tl.load(part_lse_ptr + seq * stride_lb + head * stride_lh + splits, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    weights = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # no key anywhere: all 0
    total = tl.sum(weights, axis=0)
    part_offsets = seq * stride_pb + head * stride_ph + splits * stride_ps
    parts = _load_rows(part_out_ptr, part_offsets, 1, D, split_ok, True)  # [SPLITS, D]
    out = tl.sum(parts * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + tl.arange(0, D), out.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int  # rows: queries x heads of a group
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2


def paged_prefill_config(max_rows: int) -> PrefillConfig:
    """128 rows (8 warps), fewer (4 warps) when no sequence has that many (query, head) rows."""
    block_m = min(128, max(16, triton.next_power_of_2(max_rows)))
    return PrefillConfig(block_m, num_warps=8 if block_m == 128 else 4)


@dataclass(frozen=True)
class DecodeConfig:
    block_h: int  # the group's query heads, padded to a tl.dot's 16 rows
    block_n: int = DECODE_BLOCK_N
    num_warps: int = 4
    num_stages: int = 2  # within 10% of the fastest of 27 variants at batch 32 and 128 on the H200, bf16 and FP8


def paged_decode_config(group_size: int) -> DecodeConfig:
    return DecodeConfig(max(16, triton.next_power_of_2(group_size)))


def merge_tile(num_splits: int) -> int:
    """Two merge variants in all, whatever the step's split count (each new one would compile mid-serving)."""
    return SMALL_MERGE_TILE if num_splits <= SMALL_MERGE_TILE else MAX_SPLITS


def paged_decode_num_splits(batch_size: int, num_kv_heads: int, max_context_len: int, device) -> int:
    """Splits per (sequence, KV head) so that the decode grid fills about two waves of the SMs, without
    splits shorter than MIN_TILES_PER_SPLIT key tiles of the longest context; at most MAX_SPLITS."""
    programs = max(batch_size * num_kv_heads, 1)
    wanted = triton.cdiv(2 * multiprocessors(device), programs)
    longest = max(max_context_len // (MIN_TILES_PER_SPLIT * DECODE_BLOCK_N), 1)
    return max(1, min(wanted, longest, MAX_SPLITS))


def _check_head_dim(head_dim: int) -> None:
    if not 16 <= head_dim <= 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head dim {head_dim} is not a power of two in 16..256")


def _cache_args(q, k_cache, kv_scale, scale, sliding_window, chunk_size) -> tuple[list, dict]:
    """What both kernels take: (kv_scale_ptr, qk_scale, sliding_window, chunk_size, group_size) and the
    constexprs that describe the cache and the mask."""
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8 and kv_scale is None:
        raise ValueError("an FP8 cache needs its kv_scale")
    _check_head_dim(q.shape[-1])
    runtime = [kv_scale if fp8 else q,  # kv_scale_ptr is only read with FP8
               scale * LOG2E, sliding_window or 0, chunk_size or 0, q.shape[1] // k_cache.shape[2]]
    constexprs = dict(D=q.shape[-1], BLOCK_SIZE=k_cache.shape[1], HAS_WINDOW=sliding_window is not None,
                      HAS_CHUNK=chunk_size is not None, FP8=fp8,
                      FP8_AS_FP16=FP8_AS_FP16 and q.dtype != torch.float32,  # fp32 models keep fp32 products
                      PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return runtime, constexprs


def paged_prefill(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    block_table: torch.Tensor,  # [B, M] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32: context lengths, this step's tokens included
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    kv_scale: torch.Tensor | None = None,  # [1] fp32 on the device, for an FP8 cache
) -> torch.Tensor:  # [T, Hq, D] in q.dtype
    """Each sequence's queries (the last qlen positions of its context) over its cached context."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch, num_kv_heads = seq_lens.shape[0], k_cache.shape[2]
    if batch == 0 or q.shape[0] == 0 or max_query_len == 0:
        return out
    runtime, constexprs = _cache_args(q, k_cache, kv_scale, scale, sliding_window, chunk_size)
    group_size = q.shape[1] // num_kv_heads
    config = paged_prefill_config(max_query_len * group_size)
    grid = (triton.cdiv(max_query_len * group_size, config.block_m), num_kv_heads, batch)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, out, block_table, query_start_loc, seq_lens, *runtime,
        *q.stride(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        out.stride(0), out.stride(1), block_table.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, **constexprs,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def paged_decode(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [B, M] int32
    seq_lens: torch.Tensor,  # [B] int32 (0: a padding row, which gets out 0)
    scale: float,
    num_splits: int,  # e.g. paged_decode_num_splits(...)
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    kv_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,  # [B, Hq, D], written in place if given
) -> torch.Tensor:
    """One query per sequence, at position seq_lens[b] - 1: split-KV flash decoding (CUDA-graph safe)."""
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits {num_splits} is not in 1..{MAX_SPLITS}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return out
    runtime, constexprs = _cache_args(q, k_cache, kv_scale, scale, sliding_window, chunk_size)
    num_kv_heads = k_cache.shape[2]
    config = paged_decode_config(num_heads // num_kv_heads)
    part_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, part_out, part_lse, block_table, seq_lens, *runtime, num_splits,
        *q.stride(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3), block_table.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        BLOCK_H=config.block_h, BLOCK_N=config.block_n, **constexprs,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    _merge_splits_kernel[(batch, num_heads)](
        part_out, part_lse, out, num_splits, part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
        SPLITS=merge_tile(num_splits), D=head_dim,
    )
    return out


def paged_prefill_reference(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale,
                            sliding_window=None, chunk_size=None, kv_scale=None):
    """The spec of paged_prefill: each sequence's context gathered slot by slot, attention in fp32."""
    block_size = k_cache.shape[1]
    keys_by_slot, values_by_slot = k_cache.flatten(0, 1), v_cache.flatten(0, 1)  # [slots, Hk, D]
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    for b, (q0, q1) in enumerate(zip(starts, starts[1:])):
        seq_len = int(seq_lens[b])
        slots = context_slots(block_table[b], seq_len, block_size)
        keys = from_cache_dtype(keys_by_slot[slots], torch.float32, kv_scale)
        values = from_cache_dtype(values_by_slot[slots], torch.float32, kv_scale)
        positions = torch.arange(seq_len - (q1 - q0), seq_len, device=q.device)
        allowed = causal_mask(positions, torch.arange(seq_len, device=q.device), sliding_window, chunk_size)
        out[q0:q1] = attention_with_lse(q[q0:q1].float(), keys, values, allowed, scale)[0].to(q.dtype)
    return out


def paged_decode_reference(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window=None, chunk_size=None,
                           kv_scale=None):
    """The spec of paged_decode: a prefill with one query per sequence."""
    one_query_each = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_prefill_reference(q, k_cache, v_cache, block_table, one_query_each, seq_lens, scale,
                                   sliding_window, chunk_size, kv_scale)
