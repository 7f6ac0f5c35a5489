import torch
from torch import nn

from moeserve.ops.linear import quantized_linear
from moeserve.quant.formats import QuantizedWeight


class QuantLinear(nn.Module):
    """A Linear whose weight is quantized, computed by moeserve.ops.linear.quantized_linear: FP8 block
    weights with FP8 1x128 activations (W8A8), NVFP4 with 16-bit activations (W4A16); on CUDA through
    kernels that read the stored format."""

    def __init__(self, weight: QuantizedWeight, bias: nn.Parameter | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.bias)


def fuse_linear_weights(*linears: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One weight [N1 + N2 + ..., K] (and bias, when they all have one) for linears that read the same input,
    so that one GEMM computes them all; each linear's parameters become views of the fused ones (no second
    copy). None, and nothing changed, when they cannot share a GEMM: quantized, or of different dtypes,
    devices, input sizes or bias presence."""
    if not all(type(linear) is nn.Linear for linear in linears):
        return None
    weights = [linear.weight for linear in linears]
    has_bias = {linear.bias is not None for linear in linears}
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1 or len(has_bias) != 1 or weights[0].is_meta:
        return None
    sizes = [w.shape[0] for w in weights]
    fused = torch.cat([w.detach() for w in weights])
    for linear, part in zip(linears, fused.split(sizes)):
        linear.weight = nn.Parameter(part, requires_grad=False)
    if not has_bias.pop():
        return fused, None
    fused_bias = torch.cat([linear.bias.detach() for linear in linears])
    for linear, part in zip(linears, fused_bias.split(sizes)):
        linear.bias = nn.Parameter(part, requires_grad=False)
    return fused, fused_bias
