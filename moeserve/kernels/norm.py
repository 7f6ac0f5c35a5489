"""RMSNorm, optionally fused with the residual add before it, one program per row, rounding where the
Hugging Face modules round: the sum in the activation dtype, the normalisation in fp32, the result cast
back to the activation dtype, then multiplied by the weight in that dtype.
Reference: moeserve.ops.norm (rms_norm_reference, add_rms_norm_reference)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr, dim, eps,
                     stride_x, stride_residual, stride_out, ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < dim
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if ADD_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + offs, mask=ok, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * stride_out + offs, x, mask=ok)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / dim + eps)
    normed = (x32 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (weight * normed).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, D] (rows may be strided) -> weight * normalize(x), [T, D] contiguous, in the dtype weight * x has."""
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _launch(x, x, weight, out, out, eps, add_residual=False)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual), the sum rounded to x's dtype as the eager add is."""
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, out, new_residual, eps, add_residual=True)
    return out, new_residual


def _launch(x, residual, weight, out, new_residual, eps, add_residual):
    rows, dim = x.shape
    if x.stride(-1) != 1 or residual.stride(-1) != 1:
        raise ValueError("rms_norm kernels need unit stride along the normalised dim")
    if rows:
        block = triton.next_power_of_2(dim)
        _rms_norm_kernel[(rows,)](x, residual, weight, out, new_residual, dim, float(eps), x.stride(0),
                                  residual.stride(0), out.stride(0), ADD_RESIDUAL=add_residual, BLOCK=block,
                                  num_warps=max(1, min(16, block // 512)))
