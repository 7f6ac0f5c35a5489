"""Linear layers at decode batch sizes: out [M, N] = x [M, K] @ w [N, K]^T (+ bias) for M <= 16, one
program per BLOCK_N output features reading its rows of w once, K in BLOCK_K steps (memory-bound: the
weight is read once, the tokens ride along in a 16-row tensor-core tile). x may be bf16 with an fp32
weight (the fp32 routers): products in fp32 then. Reference: torch.nn.functional.linear."""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 16


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4


@triton.jit(do_not_specialize=["M"])
def _skinny_gemm_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        PRECISION: tl.constexpr):
    offs_m = tl.arange(0, 16)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((16, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + offs_k < K
        w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptrs + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x.to(w.dtype), tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def skinny_config(n: int, k: int) -> SkinnyConfig:
    """Enough programs to cover the SMs: 16 output features each up to ~4K outputs, then 32."""
    return SkinnyConfig(block_n=16 if n <= 4096 else 32)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    return (0 < rows <= MAX_ROWS and x.shape[-1] >= 16 and weight.stride(-1) == 1
            and weight.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and (weight.dtype == torch.float32 or x.dtype == weight.dtype))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None, config: SkinnyConfig | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for at most 16 rows of x; the output in out_dtype (default x's; an fp32
    weight gives fp32 unless told otherwise)."""
    k = x.shape[-1]
    n = weight.shape[0]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_dtype = out_dtype or (torch.float32 if weight.dtype == torch.float32 else x.dtype)
    out = torch.empty(rows.shape[0], n, dtype=out_dtype, device=x.device)
    config = config or skinny_config(n, k)
    _skinny_gemm_kernel[(triton.cdiv(n, config.block_n),)](
        rows, weight, weight if bias is None else bias, out, rows.shape[0], n, k, rows.stride(0), weight.stride(0),
        out.stride(0), BLOCK_N=config.block_n, BLOCK_K=config.block_k, HAS_BIAS=bias is not None,
        PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out.reshape(*x.shape[:-1], n)
