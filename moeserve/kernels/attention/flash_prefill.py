"""Flash attention over variable-length sequences with contiguous K/V (MLA's prefill), its log-sum-exp,
and the exact merge of two partial attentions. References: `flash_attention_varlen_reference` (per
sequence, through moeserve.layers.attention.dense) and dense.merge_attention.

The online softmax runs in the log2 domain (log2(e) folded into the scale, exp2). A head dim that is
not a power of two (MLA: 192 = 128 nope + 64 rope) is read as two power-of-two parts whose dots are
summed, rather than padded to the next power of two. In causal mode only the key tiles that cross a
query tile's diagonal are masked, and those past it are never read.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeserve.layers.attention.dense import attention_with_lse, causal_mask

LOG2E = 1.4426950408889634  # folded into the scale on the host
LN2 = tl.constexpr(0.6931471805599453)
# The running max starts here rather than at -inf: a row whose keys so far are all masked then gets
# exp2(-inf - floor) = 0 instead of exp2(-inf + inf) = NaN.
SCORE_FLOOR = tl.constexpr(-1.0e30)


@triton.jit
def _online_softmax(scores, m_i, l_i):
    """One key tile of the online softmax (log2 domain). scores [M, N] -> (probabilities [M, N], the factor
    that rescales the earlier tiles [M], the new running max [M], the new running sum [M])."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _normalize(acc, m_i, l_i):
    """-> (out [M, D], lse [M] in log2 units); a row that saw no key gets out 0 and lse -inf."""
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    return acc / l_safe[:, None], tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))


@triton.jit
def _load_rows(base, row_offsets, stride_d, D: tl.constexpr, row_ok, MASKED: tl.constexpr):
    """base[row_offsets[i] + d * stride_d] -> [len(row_offsets), D]; rows not ok read 0 (if MASKED)."""
    ptrs = base + row_offsets[:, None] + tl.arange(0, D)[None, :] * stride_d
    if MASKED:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _attend_key_tiles(acc, m_i, l_i, q_main, q_tail, k_base, v_base, query_pos, n_lo, n_hi, k_len, qk_scale,
                      stride_kt, stride_kd, stride_vt, stride_vd,
                      BLOCK_N: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, DV: tl.constexpr,
                      CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Key tiles n_lo, n_lo + BLOCK_N, ... below n_hi. MASKED: mask keys past k_len and, if CAUSAL, keys
    past each query's position query_pos [M]; otherwise every key of every tile is seen."""
    for n0 in tl.range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = offs_n < k_len
        key_offsets = offs_n.to(tl.int64) * stride_kt
        k_main = _load_rows(k_base, key_offsets, stride_kd, D_MAIN, key_ok, MASKED)  # [N, D_MAIN]
        scores = tl.dot(q_main, tl.trans(k_main), input_precision=PRECISION)
        if D_TAIL > 0:
            k_tail = _load_rows(k_base + D_MAIN * stride_kd, key_offsets, stride_kd, D_TAIL, key_ok, MASKED)
            scores = tl.dot(q_tail, tl.trans(k_tail), scores, input_precision=PRECISION)
        scores = scores * qk_scale
        if MASKED:
            allowed = key_ok[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= query_pos[:, None])
            scores = tl.where(allowed, scores, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(scores, m_i, l_i)
        v = _load_rows(v_base, offs_n.to(tl.int64) * stride_vt, stride_vd, DV, key_ok, MASKED)  # [N, DV]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["stride_lh"])  # these vary from step to step
def _flash_varlen_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, qk_scale, heads_per_kv,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_lh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    DV: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (query tile, head, sequence). Query i of a sequence (Lq queries, Lk keys) sits at key
    position i + Lk - Lq; causal: it sees keys j <= that position (bottom-right aligned)."""
    m_block, head, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    k_start = tl.load(cu_k_ptr + seq)
    k_len = tl.load(cu_k_ptr + seq + 1) - k_start
    m0 = m_block * BLOCK_M
    if m0 >= q_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    q_base = q_ptr + q_start.to(tl.int64) * stride_qt + head * stride_qh
    query_offsets = offs_m.to(tl.int64) * stride_qt
    q_main = _load_rows(q_base, query_offsets, stride_qd, D_MAIN, row_ok, True)  # [M, D_MAIN]
    q_tail = None
    if D_TAIL > 0:
        q_tail = _load_rows(q_base + D_MAIN * stride_qd, query_offsets, stride_qd, D_TAIL, row_ok, True)
    kv_head = head // heads_per_kv
    k_base = k_ptr + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = v_ptr + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    query_pos = offs_m + k_len - q_len
    if CAUSAL:  # keys past the last query's diagonal are never read; those below the first query's are all seen
        n_end = tl.minimum(k_len, m0 + BLOCK_M + k_len - q_len)
        n_full = tl.maximum(tl.minimum(k_len, m0 + 1 + k_len - q_len), 0) // BLOCK_N * BLOCK_N
    else:
        n_end = k_len
        n_full = k_len // BLOCK_N * BLOCK_N
    acc = tl.zeros((BLOCK_M, DV), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), SCORE_FLOOR, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend_key_tiles(acc, m_i, l_i, q_main, q_tail, k_base, v_base, query_pos, 0, n_full, k_len,
                                      qk_scale, stride_kt, stride_kd, stride_vt, stride_vd,
                                      BLOCK_N, D_MAIN, D_TAIL, DV, CAUSAL, False, PRECISION)
    acc, m_i, l_i = _attend_key_tiles(acc, m_i, l_i, q_main, q_tail, k_base, v_base, query_pos, n_full, n_end, k_len,
                                      qk_scale, stride_kt, stride_kd, stride_vt, stride_vd,
                                      BLOCK_N, D_MAIN, D_TAIL, DV, CAUSAL, True, PRECISION)
    out, lse = _normalize(acc, m_i, l_i)
    rows = (q_start + offs_m).to(tl.int64)
    out_ptrs = out_ptr + rows[:, None] * stride_ot + head * stride_oh + tl.arange(0, DV)[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + head * stride_lh + rows, lse * LN2, mask=row_ok)


SHARED_MEMORY = 232448  # bytes a CTA may use on H100 / H200


@dataclass(frozen=True)
class FlashConfig:
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


def flash_config(head_dim: int, value_dim: int) -> FlashConfig:
    """128 x 64 tiles, 8 warps, three stages of K/V tiles where they fit in shared memory beside the
    query tile (Dqk 192 / Dv 128: 168 KiB), else two (scripts/attention_sass.py prints the real figures)."""
    config = FlashConfig()
    bytes_16bit = 2 * (config.block_m * head_dim + 3 * config.block_n * (head_dim + value_dim))
    return config if bytes_16bit <= SHARED_MEMORY else FlashConfig(num_stages=2)


def head_dim_parts(head_dim: int) -> tuple[int, int]:
    """head_dim -> (main, tail): the largest power of two <= head_dim and the rest, itself 0 or a power
    of two >= 16 (a tl.dot needs K >= 16): 192 -> (128, 64), 48 -> (32, 16), 128 -> (128, 0)."""
    main = 1 << (head_dim.bit_length() - 1)
    tail = head_dim - main
    if main < 16 or (tail and (tail < 16 or tail & (tail - 1))):
        raise ValueError(f"head dim {head_dim} is not a power of two >= 16 plus 0 or a power of two >= 16")
    return main, tail


def flash_attention_varlen(
    q: torch.Tensor,  # [Tq, H, Dqk]
    k: torch.Tensor,  # [Tk, Hk, Dqk]
    v: torch.Tensor,  # [Tk, Hk, Dv]
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32
    cu_seqlens_k: torch.Tensor,  # [B + 1] int32
    max_seqlen_q: int,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # out [Tq, H, Dv] in q.dtype, lse [H, Tq] fp32
    """Attention of each sequence's queries over its keys (causal: bottom-right aligned). Query head h
    reads KV head h // (H / Hk). A query with no key gets out 0, lse -inf. Any strides."""
    num_tokens, num_heads, head_dim = q.shape
    dv = v.shape[-1]
    if dv < 16 or dv & (dv - 1):
        raise ValueError(f"value head dim {dv} is not a power of two >= 16")
    d_main, d_tail = head_dim_parts(head_dim)
    out = torch.empty(num_tokens, num_heads, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_heads, num_tokens, dtype=torch.float32, device=q.device)
    batch = cu_seqlens_q.numel() - 1
    if num_tokens == 0 or batch == 0:
        return out, lse
    config = flash_config(head_dim, dv)
    grid = (triton.cdiv(max_seqlen_q, config.block_m), num_heads, batch)
    _flash_varlen_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale * LOG2E, num_heads // k.shape[1],
        *q.stride(), *k.stride(), *v.stride(), out.stride(0), out.stride(1), lse.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, D_MAIN=d_main, D_TAIL=d_tail, DV=dv, CAUSAL=causal,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, lse


def flash_attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal):
    """The spec of flash_attention_varlen: each sequence through dense.attention_with_lse in fp32."""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for q0, q1, k0, k1 in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:]):
        q_len, k_len = q1 - q0, k1 - k0
        keys = torch.arange(k_len, device=q.device)
        if causal:
            allowed = causal_mask(torch.arange(q_len, device=q.device) + k_len - q_len, keys)
        else:
            allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device)
        seq_out, seq_lse = attention_with_lse(q[q0:q1].float(), k[k0:k1].float(), v[k0:k1].float(), allowed, scale)
        out[q0:q1], lse[:, q0:q1] = seq_out.to(q.dtype), seq_lse
    return out, lse


@triton.jit(do_not_specialize=["stride_lse_a", "stride_lse_b", "stride_lse"])  # these vary from step to step
def _merge_kernel(out_a_ptr, lse_a_ptr, out_b_ptr, lse_b_ptr, out_ptr, lse_ptr, num_heads,
                  stride_at, stride_ah, stride_bt, stride_bh, stride_ot, stride_oh, stride_lse_a, stride_lse_b,
                  stride_lse, BLOCK_H: tl.constexpr, DV: tl.constexpr):
    """Program (token, block of heads)."""
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    lse_a = tl.load(lse_a_ptr + heads * stride_lse_a + token, mask=head_ok, other=float("-inf"))
    lse_b = tl.load(lse_b_ptr + heads * stride_lse_b + token, mask=head_ok, other=float("-inf"))
    top = tl.maximum(lse_a, lse_b)
    top = tl.where(top == float("-inf"), 0.0, top)  # both empty: both weights 0
    weight_a, weight_b = tl.exp(lse_a - top), tl.exp(lse_b - top)
    total = weight_a + weight_b
    seen = total > 0
    total_safe = tl.where(seen, total, 1.0)
    out_a = _load_rows(out_a_ptr + token * stride_at, heads * stride_ah, 1, DV, head_ok, True).to(tl.float32)
    out_b = _load_rows(out_b_ptr + token * stride_bt, heads * stride_bh, 1, DV, head_ok, True).to(tl.float32)
    out = out_a * (weight_a / total_safe)[:, None] + out_b * (weight_b / total_safe)[:, None]  # [BLOCK_H, DV]
    out_ptrs = out_ptr + token * stride_ot + heads[:, None] * stride_oh + tl.arange(0, DV)[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    lse = tl.where(seen, top + tl.log(total_safe), float("-inf"))
    tl.store(lse_ptr + heads * stride_lse + token, lse, mask=head_ok)


MERGE_BLOCK_H = 16


def merge_attention_states(
    out_a: torch.Tensor,  # [T, H, Dv]
    lse_a: torch.Tensor,  # [H, T] fp32
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # out [T, H, Dv] in out_a.dtype, lse [H, T]
    """dense.merge_attention in one kernel, which also returns the merged lse, so that the chunks of a
    long cached prefix can be merged one after another."""
    num_tokens, num_heads, dv = out_a.shape
    if dv & (dv - 1) or any(t.stride(-1) != 1 for t in (out_a, out_b, lse_a, lse_b)):
        raise ValueError("the merge needs a power-of-two value head dim and inputs contiguous in their last dim")
    out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(num_heads, num_tokens, dtype=torch.float32, device=out_a.device)
    if num_tokens == 0:
        return out, lse
    grid = (num_tokens, triton.cdiv(num_heads, MERGE_BLOCK_H))
    _merge_kernel[grid](out_a, lse_a, out_b, lse_b, out, lse, num_heads, out_a.stride(0), out_a.stride(1),
                        out_b.stride(0), out_b.stride(1), out.stride(0), out.stride(1),
                        lse_a.stride(0), lse_b.stride(0), lse.stride(0), BLOCK_H=MERGE_BLOCK_H, DV=dv)
    return out, lse
