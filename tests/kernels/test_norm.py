"""RMSNorm kernels against the torch specification, bit for bit: strided rows, odd widths, the fused
residual add, outputs that start as NaN."""

import pytest
import torch

from moeserve.kernels import norm
from moeserve.ops.norm import add_rms_norm_reference, rms_norm_reference
from tests.kernels.poison import PoisonedTorch

# The kernel sums in another order than torch: the fp32 rms may differ in its last bit, which can move
# a bf16 result by one unit in the last place (and an fp32 one by a few).
ONE_ULP = {torch.bfloat16: dict(rtol=2**-7, atol=0), torch.float32: dict(rtol=1e-6, atol=1e-7)}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(norm, "torch", PoisonedTorch())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,dim", [(1, 64), (7, 200), (3, 1536)])
def test_rms_norm_matches_reference(rows, dim, dtype):
    x = (torch.randn(rows, dim) * 3).to(dtype)
    weight = (torch.rand(dim) + 0.5).to(dtype)
    out = norm.rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out, rms_norm_reference(x, weight, 1e-6), **ONE_ULP[dtype])


def test_rms_norm_reads_strided_rows():
    wide = torch.randn(5, 96).to(torch.bfloat16)
    x = wide[:, :64]  # MLA's latent: the first columns of a wider projection
    weight = (torch.rand(64) + 0.5).to(torch.bfloat16)
    out = norm.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(out, rms_norm_reference(x, weight, 1e-6), **ONE_ULP[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_add_rms_norm_matches_reference(dtype):
    x, residual = (torch.randn(9, 320) * 2).to(dtype), (torch.randn(9, 320) * 5).to(dtype)
    weight = (torch.rand(320) + 0.5).to(dtype)
    out, total = norm.add_rms_norm(x, residual, weight, 1e-5)
    ref_out, ref_total = add_rms_norm_reference(x, residual, weight, 1e-5)
    assert not out.isnan().any() and not total.isnan().any()
    torch.testing.assert_close(total, ref_total, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, **ONE_ULP[dtype])


def test_zero_rows_and_bad_strides():
    weight = torch.ones(64)
    assert norm.rms_norm(torch.empty(0, 64), weight, 1e-6).shape == (0, 64)
    with pytest.raises(ValueError, match="unit stride"):
        norm.rms_norm(torch.randn(64, 4).t(), torch.ones(64), 1e-6)
