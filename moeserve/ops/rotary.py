"""Rotary embedding of queries and keys: the fused in-place Triton kernel on CUDA once the runner has
built the cos|sin table (`prepare_rotary_tables`), the torch specification (`apply_rotary`) otherwise."""

import torch

from moeserve.layers.norm import RMSNorm
from moeserve.layers.rotary import RotaryEmbedding, apply_rotary


def rotate_query_key(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                     interleaved: bool, q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None):
    """q [T, Hq, D], k [T, Hk, D] or [T, D] (one head shared by all) -> both rotated by their token's
    position, after per-head RMSNorms q_norm / k_norm when given (Qwen3)."""
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
