"""Quantized dense linears on CUDA, reading the stored format: FP8 128x128-block weights with the
activations quantized 1x128 per token inside the GEMM (W8A8), and NVFP4 weights dequantized in registers (W4A16), both
through the grouped GEMM's kernel in dense mode. Up to DENSE_KERNEL_MAX_ROWS rows, where it measured
faster than dequantizing every call for cuBLAS (H200, V3 shapes: 1.2-27x at 1-1,024 rows); longer prefills
take that path (cuBLAS's bf16 rate there beats this kernel's FP8 rate today).
From CUBLAS_MIN_ROWS rows, FP8 goes to cuBLAS's DeepSeek block scaling instead (torch._scaled_mm with 1x128 and
128x128 scales, CUDA >= 12.9 on sm_90): the same W8A8 arithmetic at 1,031-1,128 TFLOP/s on V3's large shapes at
8,192 rows (H100, docs/perf.md).
Reference: moeserve.ops.linear.quantized_linear_reference."""

import functools
import logging

import torch
import triton

from moeserve.kernels.activation import quantize_fp8_activations
from moeserve.kernels.device import multiprocessors
from moeserve.kernels.moe_gemm import (FP8, FP8_BLOCK, IN_GEMM_QUANTIZATION_MAX_ROWS, NVFP4, GemmConfig, dense_gemm,
                                       weight_format)

logger = logging.getLogger(__name__)

DENSE_KERNEL_MAX_ROWS = 1024
CUBLAS_MIN_ROWS = 128  # below, the dense kernel was as fast or faster (H100, V3 shapes)
CUBLAS_K_MULTIPLE = 512  # torch 2.11+cu130's block scaling gave wrong sums (no error) for K of 2, 3, 5-7, 10, 22 blocks
CUBLAS_ROW_MULTIPLE = 4  # its column-major activation scales need 16-byte aligned columns
CUBLAS_N_MULTIPLE = 16  # torch._scaled_mm's requirement on the weight's rows


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
    swap_ab = fmt == FP8 and rows <= 16  # wgmma on the weights' side: 1.59 vs 1.27 TB/s on V3 q_b, H100
    return GemmConfig(block_m=block_m, block_n=block_n, block_k=128, num_warps=4, num_stages=3, split_k=split_k,
                      swap_ab=swap_ab)


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
        a, a_scale = quantize_fp8_activations(rows)  # once, not once per N tile
    dense_gemm(a, a_scale, weight, out, config)
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], n)


def cublas_takes(weight, rows: int, dtype: torch.dtype) -> bool:
    """Whether an FP8 128x128-block weight's product with `rows` rows of bf16 goes to cuBLAS's block scaling."""
    return (rows >= CUBLAS_MIN_ROWS and dtype == torch.bfloat16 and weight_format(weight) == FP8 and len(weight.shape) == 2
            and weight.block == (FP8_BLOCK, FP8_BLOCK) and weight.shape[-1] % CUBLAS_K_MULTIPLE == 0
            and weight.shape[0] % CUBLAS_N_MULTIPLE == 0
            and cublas_block_scaling_works(weight.values.device))


def cublas_block_scaled_gemm(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias), W8A8 with 1x128 activation and 128x128 weight scales, by cuBLAS."""
    k = weight.shape[-1]
    rows = x.reshape(-1, k)
    a, a_scale = quantize_fp8_activations(rows, pad_rows_to=CUBLAS_ROW_MULTIPLE, column_major_scales=True)
    out = torch._scaled_mm(a, weight.values.t(), a_scale, weight.scale.t(), out_dtype=x.dtype)[: rows.shape[0]]
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _block_scaling_checked(device: torch.device) -> bool:
    """cuBLAS's block scaling on a small product against the reference: a build without it, or one that computes it
    wrongly, leaves FP8 on the other paths."""
    from moeserve.quant.formats import quantized
    from moeserve.quant.fp8 import fp8_group_round_trip

    if torch.cuda.get_device_capability(device) != (9, 0):
        return False
    generator = torch.Generator(device).manual_seed(0)
    weight = quantized("fp8", torch.randn(256, 1024, device=device, generator=generator) * 0.02)
    x = torch.randn(CUBLAS_MIN_ROWS + 1, 1024, device=device, generator=generator).bfloat16()
    try:
        out = cublas_block_scaled_gemm(x, weight).float()
    except Exception as error:  # a build without it: RuntimeError from cuBLAS, ValueError from torch's checks
        logger.info("cuBLAS block-scaled FP8 unavailable (%s): FP8 linears use the Triton kernel", str(error)[:200])
        return False
    expected = fp8_group_round_trip(x) @ weight.dequantize(torch.float32).t()  # the reference's W8A8
    good = bool(((out - expected).norm() <= 1e-2 * expected.norm()).item())
    if not good:
        logger.warning("cuBLAS block-scaled FP8 gave wrong results on %s: FP8 linears use the Triton kernel", device)
    return good


def cublas_block_scaling_works(device: torch.device) -> bool:
    """Checked once per device, outside CUDA-graph capture (a capture takes the other paths until then)."""
    if device not in _block_scaling_works:
        if torch.cuda.is_current_stream_capturing():
            return False
        _block_scaling_works[device] = _block_scaling_checked(device)
    return _block_scaling_works[device]


_block_scaling_works: dict[torch.device, bool] = {}
