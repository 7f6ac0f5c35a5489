import torch
import torch.nn.functional as F
from torch import nn

from moeserve.layers.linear import fuse_linear_weights
from moeserve.ops.activation import silu_and_mul


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). After `fuse_projections`, gate and up run as one GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_weight: torch.Tensor | None = None

    def fuse_projections(self) -> None:
        fused = fuse_linear_weights(self.gate_proj, self.up_proj)  # no bias: MLP's linears have none
        self.gate_up_weight = fused[0] if fused is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            return self.down_proj(silu_and_mul(F.linear(x, self.gate_up_weight)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
