import torch
import torch.nn.functional as F
from torch import nn

from moeserve.layers.linear import fuse_linear_weights, linear
from moeserve.ops.activation import silu_and_mul


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). After `fuse_projections`, gate and up run as one GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.fused_gate_up = None  # (weight, None) after fuse_projections: a tuple, so a quantized one is no submodule

    @property
    def gate_up_weight(self):
        return None if self.fused_gate_up is None else self.fused_gate_up[0]

    def fuse_projections(self) -> None:
        self.fused_gate_up = fuse_linear_weights(self.gate_proj, self.up_proj)  # no bias: MLP's linears have none

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is not None:
            return self.down_proj(silu_and_mul(linear(x, self.gate_up_weight)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
