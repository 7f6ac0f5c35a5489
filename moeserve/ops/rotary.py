"""Rotary embedding of queries and keys: the fused in-place Triton kernel on CUDA once the runner has
built the cos|sin table (`prepare_rotary_tables`), the torch specification (`apply_rotary`) otherwise."""

import torch


def rotate_query_key(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rotary,
                     interleaved: bool, q_norm=None, k_norm=None):
    """q [T, Hq, D], k [T, Hk, D] or [T, D] (one head shared by all) -> both rotated by their token's
    position, after per-head RMSNorms q_norm / k_norm when given (Qwen3). rotary: a RotaryEmbedding
    (positions -> cos, sin; `table` once prepared)."""
    if q.is_cuda and rotary.table is not None:
        from moeserve.kernels.rotary import rope_

        norms = None if q_norm is None else (q_norm.weight, k_norm.weight)
        rope_(q, k, positions, rotary.table, interleaved, norms, q_norm.eps if q_norm is not None else 1e-6)
        return q, k
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    cos, sin = rotary(positions)  # [T, D/2]
    return tuple(apply_rotary(x, *per_head(x, cos, sin), interleaved) for x in (q, k))


def per_head(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (cos.unsqueeze(-2), sin.unsqueeze(-2)) if x.dim() == 3 else (cos, sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [..., D] by angles whose cos/sin [..., D/2] broadcast against x's leading dims.

    Interleaved: dims (2i, 2i+1) form pair i (DeepSeek's and Llama 4's complex RoPE). Otherwise dims
    (i, i + D/2) form pair i (rotate_half). Computed in fp32, returned in x's dtype.
    """
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf.chunk(2, dim=-1)
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    out = torch.stack((out1, out2), dim=-1).flatten(-2) if interleaved else torch.cat((out1, out2), dim=-1)
    return out.to(x.dtype)
