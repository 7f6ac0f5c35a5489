"""The decode-size linear kernel against F.linear: 1-16 rows, odd N and K (partial tiles), bias, an fp32
weight with bf16 activations (fp32 products, as the routers)."""

import pytest
import torch
import torch.nn.functional as F

from moeserve.kernels.skinny_gemm import SkinnyConfig, skinny_linear, supports


@pytest.mark.parametrize("rows,n,k", [(1, 40, 48), (3, 17, 100), (16, 96, 272), (7, 1, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_skinny_linear_matches_f_linear(rows, n, k, dtype):
    x, w, b = torch.randn(rows, k).to(dtype), torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
    for bias in (None, b):
        out = skinny_linear(x, w, bias, config=SkinnyConfig(block_n=16, block_k=32, num_stages=1))
        expected = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), expected, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_bf16_activations_with_an_fp32_weight_give_fp32_logits():
    x, w = torch.randn(2, 3, 64).to(torch.bfloat16), torch.randn(24, 64)
    out = skinny_linear(x, w, config=SkinnyConfig(block_n=16, block_k=64, num_stages=1))
    assert out.shape == (2, 3, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x.float(), w), rtol=1e-5, atol=1e-4)


def test_what_the_kernel_takes():
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    assert supports(torch.randn(16, 64, dtype=torch.bfloat16), w)
    assert not supports(torch.randn(17, 64, dtype=torch.bfloat16), w)  # prefill sizes go to torch
    assert not supports(torch.randn(0, 64, dtype=torch.bfloat16), w)
    assert not supports(torch.randn(4, 64, dtype=torch.float16), w)  # mixed half types
    assert not supports(torch.randn(4, 64, dtype=torch.bfloat16), w.t().contiguous().t())  # strided rows
