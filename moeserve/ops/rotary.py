"""Rotary embedding of queries and keys: the fused in-place Triton kernel on CUDA once the runner has
built the cos|sin table (`prepare_rotary_tables`), the torch specification (`apply_rotary`) otherwise."""

import torch

from moeserve.layers.rotary import RotaryEmbedding, apply_rotary


def rotate_query_key(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                     interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D] or [T, D] (one head shared by all) -> both rotated by their token's position."""
    if q.is_cuda and rotary.table is not None:
        from moeserve.kernels.rotary import rope_

        rope_(q, k, positions, rotary.table, interleaved)
        return q, k
    cos, sin = rotary(positions)  # [T, D/2]
    return tuple(apply_rotary(x, *per_head(x, cos, sin), interleaved) for x in (q, k))


def per_head(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (cos.unsqueeze(-2), sin.unsqueeze(-2)) if x.dim() == 3 else (cos, sin)
