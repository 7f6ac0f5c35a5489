"""Quantized weights as explicit objects: the data, its scales and its format, for one matrix or a
stack of them ([..., N, K], e.g. [E, N, K] for experts); and tokens as a quantized dispatch hands them on."""

import math

import torch
from torch import nn

from moeserve.quant.fp8 import Fp8Activations, dequantize_fp8_block, quantize_fp8_block
from moeserve.quant.nvfp4 import BLOCK as NVFP4_BLOCK
from moeserve.quant.nvfp4 import Nvfp4Activations, dequantize_nvfp4, quantize_nvfp4_weight


def _frozen(shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class QuantizedWeight(nn.Module):
    """Stands where a weight tensor [..., N, K] would; `dequantize` gives it back in a float dtype."""

    format: str

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)

    def dequantize(self, dtype: torch.dtype, index=()) -> torch.Tensor:
        """The weight, or the matrices selected by `index` over the leading dims, in `dtype`."""
        raise NotImplementedError

    def quantize_from(self, w: torch.Tensor) -> None:
        """Quantize w (the full shape) into this weight, one [N, K] matrix at a time (bounded memory)."""
        for index, matrix in enumerate(w.reshape(-1, *self.shape[-2:])):
            self.quantize_matrices(matrix, index)

    def quantize_matrices(self, w: torch.Tensor, index: int) -> None:
        """Quantize one [N, K] matrix w into matrix `index` of the leading dims flattened: for [E, 2, I, H],
        expert e's up half is 2 * e + 1."""
        raise NotImplementedError

    @staticmethod
    def _matrices(t: torch.Tensor, tail: int) -> torch.Tensor:
        """t with its leading (matrix) dims as one, its last `tail` dims kept."""
        return t.view(-1, *t.shape[t.dim() - tail:])

    def extra_repr(self) -> str:
        return f"{self.format}, shape={list(self.shape)}"


class Fp8BlockWeight(QuantizedWeight):
    format = "fp8"

    def __init__(self, shape: tuple[int, ...], block: tuple[int, int] = (128, 128)):
        super().__init__(shape)
        self.block = tuple(block)
        n, k = shape[-2:]
        self.values = _frozen(shape, torch.float8_e4m3fn)
        self.scale = _frozen((*shape[:-2], math.ceil(n / block[0]), math.ceil(k / block[1])), torch.float32)

    def dequantize(self, dtype, index=()):
        return dequantize_fp8_block(self.values[index], self.scale[index], self.block, dtype)

    def quantize_matrices(self, w, index):
        values, scale = quantize_fp8_block(w, self.block)
        self._matrices(self.values.data, 2)[index].copy_(values)
        self._matrices(self.scale.data, 2)[index].copy_(scale)


class Nvfp4Weight(QuantizedWeight):
    format = "nvfp4"

    def __init__(self, shape: tuple[int, ...]):
        super().__init__(shape)
        n, k = shape[-2:]
        if k % NVFP4_BLOCK:
            raise ValueError(f"NVFP4 needs in_features divisible by {NVFP4_BLOCK}, got {k}")
        self.packed = _frozen((*shape[:-1], k // 2), torch.uint8)
        self.block_scale = _frozen((*shape[:-1], k // NVFP4_BLOCK), torch.float8_e4m3fn)
        self.global_scale = _frozen(shape[:-2], torch.float32)  # one per matrix

    def dequantize(self, dtype, index=()):
        global_scale = self.global_scale[index][..., None, None]  # one per [N, K] matrix
        return dequantize_nvfp4(self.packed[index], self.block_scale[index], global_scale, dtype)

    def quantize_matrices(self, w, index):
        packed, block_scale, global_scale = quantize_nvfp4_weight(w)
        self._matrices(self.packed.data, 2)[index].copy_(packed)
        self._matrices(self.block_scale.data, 2)[index].copy_(block_scale)
        self._matrices(self.global_scale.data, 0)[index].copy_(global_scale)


FORMATS: dict[str, type[QuantizedWeight]] = {"fp8": Fp8BlockWeight, "nvfp4": Nvfp4Weight}


def make_quantized_weight(fmt: str, shape: tuple[int, ...], block: tuple[int, int] = (128, 128)) -> QuantizedWeight:
    if fmt == "fp8":
        return Fp8BlockWeight(shape, block)
    if fmt == "nvfp4":
        return Nvfp4Weight(shape)
    raise ValueError(f"unknown quantization format {fmt!r} (known: {', '.join(FORMATS)})")


def quantized(fmt: str, w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> QuantizedWeight:
    """w [..., N, K] quantized to `fmt`, on w's device."""
    with torch.device(w.device):
        weight = make_quantized_weight(fmt, tuple(w.shape), block)
    weight.quantize_from(w)
    return weight


def weight_matrix(weight: torch.Tensor | QuantizedWeight, index, dtype: torch.dtype) -> torch.Tensor:
    """weight[index] as a float tensor, whether the weight is plain or quantized."""
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize(dtype, index)
    return weight[index]


def dequantized_tokens(x: torch.Tensor | Fp8Activations | Nvfp4Activations) -> torch.Tensor:
    """Tokens as a dispatch hands them on (a tensor, or rows still in their FP8 / NVFP4 wire format) as a tensor in
    the dtype they stand for."""
    return x.dequantize() if isinstance(x, (Fp8Activations, Nvfp4Activations)) else x
