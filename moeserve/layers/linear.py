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
