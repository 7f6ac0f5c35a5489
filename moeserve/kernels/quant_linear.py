"""Quantized dense linears on CUDA, reading the stored format: FP8 128x128-block weights with the
activations quantized 1x128 per token inside the GEMM (W8A8), and NVFP4 weights dequantized in registers (W4A16), both
through the grouped GEMM's kernel in dense mode. Up to DENSE_KERNEL_MAX_ROWS rows, where it measured
faster than dequantizing every call for cuBLAS (H200, V3 shapes: 1.2-27x at 1-1,024 rows); longer prefills
take that path (cuBLAS's bf16 rate there beats this kernel's FP8 rate today). Reference:
moeserve.ops.linear.quantized_linear_reference."""

import functools

import torch
import triton

from moeserve.kernels.device import multiprocessors
from moeserve.kernels.moe_gemm import (FP8, FP8_BLOCK, IN_GEMM_QUANTIZATION_MAX_ROWS, NVFP4, GemmConfig, dense_gemm,
                                       weight_format)
from moeserve.quant.fp8 import quantize_fp8_groups

DENSE_KERNEL_MAX_ROWS = 1024


def supports(weight, rows: int) -> bool:
    fmt = weight_format(weight)
    if not 0 < rows <= DENSE_KERNEL_MAX_ROWS or len(weight.shape) != 2:
        return False
    if fmt == FP8:
        return weight.block == (FP8_BLOCK, FP8_BLOCK)
    return fmt == NVFP4 and weight.shape[-1] % 32 == 0


@functools.cache
def dense_config(rows: int, n: int, k: int, num_sms: int, fmt: int = FP8) -> GemmConfig:
    """16-row tiles for decode (<= 16 rows; FP8 128 columns wide), 64 rows above; K split (up to 8, slices of at
    least 256) until the tiles, counted 64 columns wide, cover the SMs twice (H200 sweep, scripts/probes/quant_linear_sweep.py).
    The split halves as the rows double, so the warm-up's prefills of 32, 64, ... tokens meet every variant."""
    block_m = 16 if rows <= 16 else 64
    block_n = 128 if fmt == FP8 and rows <= 16 else 64
    narrow_tiles = triton.cdiv(rows, block_m) * triton.cdiv(n, 64)  # a 128-wide tile counts as two
    split_k = 1
    while split_k < 8 and narrow_tiles * split_k < 2 * num_sms and k // (2 * split_k) >= 256:
        split_k *= 2
    return GemmConfig(block_m=block_m, block_n=block_n, block_k=128, num_warps=4, num_stages=3, split_k=split_k)


def quantized_gemm(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
                   config: GemmConfig | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) for a QuantizedWeight W [N, K] that `supports` takes; out in x's dtype.
    config: dense_config's unless given."""
    n, k = weight.shape
    rows = x.reshape(-1, k).contiguous()
    config = config or dense_config(rows.shape[0], n, k, multiprocessors(x.device), weight_format(weight))
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    a, a_scale = rows, None  # FP8 at decode sizes: the activations are quantized 1x128 inside the GEMM
    if weight_format(weight) == FP8 and rows.shape[0] > IN_GEMM_QUANTIZATION_MAX_ROWS:
        a, a_scale = quantize_fp8_groups(rows)  # once, not once per N tile
    dense_gemm(a, a_scale, weight, out, config)
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], n)
