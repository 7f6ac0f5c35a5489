import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) in the weight's precision (an fp32 weight with bf16 x: fp32 products and
    output, as the fp32 routers need). On CUDA at decode sizes (<= 16 rows) the skinny GEMM kernel,
    which reads the weight near the card's bandwidth where cuBLAS's small-M kernels do not; else torch."""
    if x.is_cuda:
        from moeserve.kernels import skinny_gemm

        if skinny_gemm.supports(x, weight):
            return skinny_gemm.skinny_linear(x, weight, bias)
    return F.linear(x.to(weight.dtype), weight, bias)
