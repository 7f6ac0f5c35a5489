import torch
import torch.nn.functional as F

from moeserve.quant.formats import Fp8BlockWeight
from moeserve.quant.fp8 import fp8_group_round_trip


def quantized_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) for a QuantizedWeight W [N, K]. On CUDA: cuBLAS's FP8 block scaling or the kernels that
    read the stored format where they take the weight and the row count, else `dequantized_linear` (long
    prefills); elsewhere `quantized_linear_reference`."""
    if x.is_cuda:
        from moeserve.kernels import quant_linear

        rows = x.numel() // x.shape[-1]
        if quant_linear.cublas_takes(weight, rows, x.dtype):
            return quant_linear.cublas_block_scaled_gemm(x, weight, bias)
        if quant_linear.supports(weight, rows):
            return quant_linear.quantized_gemm(x, weight, bias)
        return dequantized_linear(x, weight, bias)
    return quantized_linear_reference(x, weight, bias)


def quantized_linear_reference(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 block weights take FP8 activations in groups of the weight's K block per token (1x128 for
    128x128 blocks: W8A8 as DeepSeek-V3's reference inference with gemm_impl="fp8" and as vLLM's and
    SGLang's block-FP8 linears, FP8 operands, products and scales in fp32, as the kernel; groups within a block also keep a tensor-parallel shard's sums those of the whole);
    other formats multiply the dequantized weight in x's dtype (NVFP4: W4A16)."""
    if isinstance(weight, Fp8BlockWeight):
        activations = fp8_group_round_trip(x, weight.block[1])
        out = F.linear(activations, weight.dequantize(torch.float32)).to(x.dtype)
        return out if bias is None else out + bias
    return F.linear(x, weight.dequantize(x.dtype), bias)


def dequantized_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's arithmetic with both operands dequantized to x's dtype, for cuBLAS: faster than the
    dense kernel for long prefills, where one dequantization costs less than its lower tensor-core rate."""
    if isinstance(weight, Fp8BlockWeight):
        x = fp8_group_round_trip(x, weight.block[1]).to(x.dtype)
    return F.linear(x, weight.dequantize(x.dtype), bias)
