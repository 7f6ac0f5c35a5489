import torch
import torch.nn.functional as F
from torch import nn

from moeserve.ops.linear import quantized_linear
from moeserve.quant.formats import Fp8BlockWeight, QuantizedWeight


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


def fuse_linear_weights(*linears: nn.Module) -> tuple[torch.Tensor | Fp8BlockWeight, torch.Tensor | None] | None:
    """One weight [N1 + N2 + ..., K] (and bias, when they all have one) for linears that read the same input,
    so that one GEMM computes them all (`linear` runs it); each linear's parameters become views of the fused ones (no
    second copy). Plain linears of one dtype, or FP8 128x128-block ones where every part but the last fills whole
    blocks of rows (their scale rows then stack as the rows do). None, and nothing changed, when they cannot share a
    GEMM: other formats (NVFP4's global scale is per matrix), or different dtypes, devices, input sizes or bias
    presence."""
    if len({module.bias is not None for module in linears}) != 1:
        return None
    if all(type(module) is nn.Linear for module in linears):
        fused = _fuse_plain_weights(linears)
    elif all(type(module) is QuantLinear for module in linears):
        fused = _fuse_fp8_weights(linears)
    else:
        return None
    if fused is None:
        return None
    return fused, _fuse_biases(linears)


def _fuse_plain_weights(linears) -> torch.Tensor | None:
    weights = [module.weight for module in linears]
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1 or weights[0].is_meta:
        return None
    fused = torch.cat([w.detach() for w in weights])
    for module, part in zip(linears, fused.split([w.shape[0] for w in weights])):
        module.weight = nn.Parameter(part, requires_grad=False)
    return fused


def _fuse_fp8_weights(linears) -> Fp8BlockWeight | None:
    weights = [module.weight for module in linears]
    if not all(isinstance(w, Fp8BlockWeight) and len(w.shape) == 2 for w in weights) or weights[0].values.is_meta:
        return None
    rows_per_block = weights[0].block[0]
    if len({(w.block, w.shape[1], w.values.device) for w in weights}) != 1 or any(
            w.shape[0] % rows_per_block for w in weights[:-1]):
        return None
    with torch.device("meta"):
        fused = Fp8BlockWeight((sum(w.shape[0] for w in weights), weights[0].shape[1]), weights[0].block)
    fused.values = nn.Parameter(torch.cat([w.values.detach() for w in weights]), requires_grad=False)
    fused.scale = nn.Parameter(torch.cat([w.scale.detach() for w in weights]), requires_grad=False)
    values = fused.values.detach().split([w.shape[0] for w in weights])
    scales = fused.scale.detach().split([w.scale.shape[0] for w in weights])
    for weight, part_values, part_scale in zip(weights, values, scales):
        weight.values = nn.Parameter(part_values, requires_grad=False)
        weight.scale = nn.Parameter(part_scale, requires_grad=False)
    return fused


def _fuse_biases(linears) -> torch.Tensor | None:
    if linears[0].bias is None:
        return None
    fused_bias = torch.cat([module.bias.detach() for module in linears])
    for module, part in zip(linears, fused_bias.split([module.out_features for module in linears])):
        module.bias = nn.Parameter(part, requires_grad=False)
    return fused_bias


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias): F.linear, or quantized_linear for a quantized weight (a fused one's)."""
    if isinstance(weight, QuantizedWeight):
        return quantized_linear(x, weight, bias)
    return F.linear(x, weight, bias)
