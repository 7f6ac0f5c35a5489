"""RMSNorm, and the residual add fused before it: the Triton kernels on CUDA, the torch specification
elsewhere. Both round where the Hugging Face modules round: the sum in the activation dtype, the
normalisation in fp32, the result cast back to the activation dtype, then multiplied by the weight."""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dim; x [..., D], weight [D]."""
    if x.is_cuda:
        from moeserve.kernels import norm

        return norm.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual); x, residual [T, D]."""
    if x.is_cuda:
        from moeserve.kernels import norm

        return norm.add_rms_norm(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, computed in fp32, returned in x's dtype (Llama 4's L2Norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * rms_normalize(x, eps)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    total = x + residual
    return rms_norm_reference(total, weight, eps), total
