import torch
import torch.nn.functional as F
from torch import nn

from moeserve.quant.formats import QuantizedWeight


class QuantLinear(nn.Module):
    """A Linear whose weight is quantized. The reference path dequantizes the weight and multiplies in
    the activation dtype (W8A16 / W4A16 semantics); GPU kernels implement the same product."""

    def __init__(self, weight: QuantizedWeight, bias: nn.Parameter | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.dequantize(x.dtype), self.bias)


def fuse_linear_weights(*linears: nn.Module) -> torch.Tensor | None:
    """One weight [N1 + N2 + ..., K] for linears that read the same input, so that one GEMM computes them
    all; each linear's weight becomes a view of it (no second copy). None, and nothing changed, when they
    cannot share a GEMM: quantized, biased, or of different dtypes, devices or input sizes."""
    if not all(type(linear) is nn.Linear and linear.bias is None for linear in linears):
        return None
    weights = [linear.weight for linear in linears]
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1 or weights[0].is_meta:
        return None
    fused = torch.cat([w.detach() for w in weights])
    for linear, part in zip(linears, fused.split([w.shape[0] for w in weights])):
        linear.weight = nn.Parameter(part, requires_grad=False)
    return fused
