"""Rotary embedding of queries and keys in place, one program per token, angles read from a cos|sin
table [positions, D] built once (cos in the first D/2 columns, sin in the rest, fp32, attention factor
applied). Computed in fp32 and stored in the tensors' dtype, as moeserve.ops.rotary.apply_rotary;
optionally after a per-head RMSNorm (Qwen3's q_norm / k_norm), rounded where that module rounds.
Reference: moeserve.ops.rotary (rotate_query_key's torch path)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_halves(x1, x2, weight_ptr, first, second, d_ok, eps, HALF: tl.constexpr, dtype: tl.constexpr):
    """A head's two halves [BLOCK_H, HALF] -> weight * normalize(head), each product rounded to dtype."""
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(weight_ptr + first, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(weight_ptr + second, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    y1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    y2 = (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return y1, y2


@triton.jit
def _rotate_heads(x_ptr, weight_ptr, eps, stride_t, stride_h, num_heads, t, cos, sin, d, d_ok,
                  HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, NORM: tl.constexpr):
    if INTERLEAVED:
        first, second = 2 * d, 2 * d + 1
    else:
        first, second = d, d + HALF
    for h0 in range(0, num_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        ok = (h < num_heads)[:, None] & d_ok[None, :]
        row = x_ptr + t * stride_t + h[:, None].to(tl.int64) * stride_h
        x1 = tl.load(row + first[None, :], mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(row + second[None, :], mask=ok, other=0.0).to(tl.float32)
        if NORM:
            x1, x2 = _rms_norm_halves(x1, x2, weight_ptr, first, second, d_ok, eps, HALF, x_ptr.dtype.element_ty)
        tl.store(row + first[None, :], (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=ok)
        tl.store(row + second[None, :], (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, positions_ptr, table_ptr, q_weight_ptr, k_weight_ptr, eps, q_heads, k_heads,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_table, HALF: tl.constexpr,
                 INTERLEAVED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, NORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    cos = tl.load(table_ptr + position * stride_table + d, mask=d_ok, other=0.0)[None, :]
    sin = tl.load(table_ptr + position * stride_table + HALF + d, mask=d_ok, other=0.0)[None, :]
    _rotate_heads(q_ptr, q_weight_ptr, eps, stride_qt, stride_qh, q_heads, t, cos, sin, d, d_ok, HALF, INTERLEAVED,
                  BLOCK_H, NORM)
    _rotate_heads(k_ptr, k_weight_ptr, eps, stride_kt, stride_kh, k_heads, t, cos, sin, d, d_ok, HALF, INTERLEAVED,
                  BLOCK_H, NORM)


def rope_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, interleaved: bool,
          norm_weights: tuple[torch.Tensor, torch.Tensor] | None = None, eps: float = 1e-6) -> None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] or [T, D] in place (strided views allowed, unit last stride),
    token t by table row positions[t]; with norm_weights (q's [D], k's [D]), RMSNorm each head first."""
    k3 = k.unsqueeze(1) if k.dim() == 2 else k
    tokens, _, dim = q.shape
    if q.stride(-1) != 1 or k3.stride(-1) != 1 or dim % 2 or k3.shape[-1] != dim or table.shape[-1] != dim:
        raise ValueError(f"rope_ needs q, k with equal even last dims of unit stride and a [N, {dim}] table, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, table {tuple(table.shape)}")
    if tokens:
        q_weight, k_weight = norm_weights if norm_weights is not None else (table, table)
        _rope_kernel[(tokens,)](q, k3, positions, table, q_weight, k_weight, float(eps), q.shape[1], k3.shape[1],
                                q.stride(0), q.stride(1), k3.stride(0), k3.stride(1), table.stride(0), HALF=dim // 2,
                                INTERLEAVED=interleaved, BLOCK_D=triton.next_power_of_2(dim // 2), BLOCK_H=16,
                                NORM=norm_weights is not None)
