"""SwiGLU's silu(gate) * up over a fused [gate | up] projection: one Triton kernel on CUDA, torch elsewhere,
both rounding as the eager expression does (silu in the activation dtype, then the product)."""

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] -> [T, I]."""
    if gate_up.is_cuda:
        from moeserve.kernels import activation

        return activation.silu_and_mul(gate_up, round_silu=True)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
