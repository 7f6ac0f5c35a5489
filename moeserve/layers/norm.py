import torch
from torch import nn

from moeserve.ops.norm import add_rms_norm, rms_norm, rms_normalize

__all__ = ["RMSNorm", "rms_normalize"]


class RMSNorm(nn.Module):
    """RMSNorm with Hugging Face precision: normalise in fp32, downcast, then apply the weight.

    forward(x) -> normed; forward(x, residual) -> (normed(x + residual), x + residual), the residual add
    of a pre-norm layer fused into the norm (one kernel on CUDA).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)
