"""The experts' forward on CUDA: layout -> gate_up GEMM (tokens read by index; FP8: x quantized 1x128 first, which
measured faster than quantizing inside the GEMM even at batch 1: each N tile redoes that) -> SiLU-and-mul (+ FP8 quantization for W8A8) -> down GEMM
(routed weight in the epilogue) -> sum over k. (row, k) pairs with no expert here (slot -1) are skipped from the
SiLU on, so their buffers are never filled (a low-latency EP receive hands on many such rows).
Reference: moeserve.layers.moe.experts.Experts.reference (same inputs, same output)."""

from typing import Protocol

import torch

from moeserve.kernels.activation import quantize_fp8_activations, silu_and_mul, sum_over_k
from moeserve.kernels.device import has_fp8
from moeserve.kernels.ep_transport import nvfp4_tokens
from moeserve.kernels.moe_gemm import BF16, FP8, NVFP4, GemmConfig, moe_gemm, weight_format
from moeserve.kernels.moe_layout import block_layout
from moeserve.kernels.row_layout import RowLayout
from moeserve.kernels.tuning import tuned_config
from moeserve.quant.fp8 import Fp8Activations
from moeserve.quant.nvfp4 import Nvfp4Activations


class ExpertWeights(Protocol):
    """What the kernels read of an Experts module: its fused weights (tensors or QuantizedWeights)."""

    num_experts: int
    gate_up_proj: torch.Tensor  # [E, 2I, H]; quantized: [E, 2, I, H]
    down_proj: torch.Tensor  # [E, H, I]


def nvfp4_format(dtype: torch.dtype) -> str:
    """The tuning name of NVFP4 weights with these activations: bf16 ones take the bit conversion and its blocks."""
    return "nvfp4" if dtype == torch.bfloat16 else f"nvfp4-{str(dtype).removeprefix('torch.').replace('float', 'fp')}"


def takes_nvfp4(experts: ExpertWeights, x: Nvfp4Activations) -> bool:
    """Whether the gate_up GEMM reads these NVFP4 rows as they are: bf16 tokens into bf16 or NVFP4 weights, where
    Triton has float8 (the block scales' type)."""
    weights = weight_format(experts.gate_up_proj)
    return x.dtype == torch.bfloat16 and has_fp8(x.device) and (
        weights == NVFP4 or weights == BF16 and experts.gate_up_proj.dtype == torch.bfloat16)


def dequantized_nvfp4_rows(x: Nvfp4Activations) -> torch.Tensor:
    """NVFP4 rows dequantized: one kernel over the rows in use where Triton has float8, else the torch form."""
    if has_fp8(x.device):
        return nvfp4_tokens(x.rows, x.hidden, x.dtype, x.rows_in_use)
    return x.dequantize()


def fused_experts(experts: ExpertWeights, x: torch.Tensor | Fp8Activations | Nvfp4Activations, layout: RowLayout,
                  config: GemmConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [R, H], or rows already quantized as a dispatch sent them: FP8 experts multiply FP8 1x128 rows as they
    are, bf16 and NVFP4 experts turn NVFP4 rows into bf16 inside the gate_up GEMM. out ([R, H], contiguous): where
    the result goes (a transport's results area)."""
    rows, top_k = layout.slots.shape
    weights = weight_format(experts.gate_up_proj)
    if isinstance(x, Fp8Activations) and weights != FP8:
        x = x.dequantize()
    if isinstance(x, Nvfp4Activations) and not takes_nvfp4(experts, x):
        x = dequantized_nvfp4_rows(x)
    fmt = {BF16: "bf16" if x.dtype != torch.float32 else "fp32", FP8: "fp8", NVFP4: nvfp4_format(x.dtype)}[weights]
    config = config or tuned_config(fmt, x.shape[1], experts.down_proj.shape[-1], rows * top_k, experts.num_experts)
    block = block_layout(layout.slots, experts.num_experts, config.block_m)
    fp8 = weights == FP8
    if isinstance(x, Fp8Activations):
        a, a_scale = x.values, x.scales
    elif isinstance(x, Nvfp4Activations):
        a, a_scale = x, None
    else:
        a, a_scale = quantize_fp8_activations(x) if fp8 else (x, None)
    intermediate = experts.down_proj.shape[-1]
    gate_up = torch.empty(rows * top_k, 2 * intermediate, dtype=x.dtype, device=x.device)
    moe_gemm(a, a_scale, experts.gate_up_proj, block, gate_up, rows_per_a_row=top_k, config=config)
    slots = layout.slots.reshape(-1)  # (row, k) pairs of other ranks (-1) are never computed; any integer dtype
    activation = silu_and_mul(gate_up, quantize=fp8, slots=slots)
    act, act_scale = activation if fp8 else (activation, None)
    down = torch.empty(rows * top_k, x.shape[1], dtype=x.dtype, device=x.device)
    moe_gemm(act, act_scale, experts.down_proj, block, down, rows_per_a_row=1,
             row_weights=layout.weights.reshape(-1).float().contiguous(), config=config)
    return sum_over_k(down, top_k, slots, out)
