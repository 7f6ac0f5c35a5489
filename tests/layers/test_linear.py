"""Linears that read the same input fused into one GEMM: plain weights, and FP8 block weights whose parts fill whole
blocks of rows (all but the last)."""

import pytest
import torch
from torch import nn

from moeserve.layers.linear import QuantLinear, fuse_linear_weights, linear
from moeserve.layers.mlp import MLP
from moeserve.quant.formats import Fp8BlockWeight, quantized

K = 256


def quant_linear(fmt: str, n: int, seed: int, bias: bool = False) -> QuantLinear:
    generator = torch.Generator().manual_seed(seed)
    weight = quantized(fmt, torch.randn(n, K, generator=generator) / K**0.5)
    return QuantLinear(weight, nn.Parameter(torch.randn(n, generator=generator), requires_grad=False) if bias else None)


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linears_fuse_into_one_weight_whose_parts_are_views(bias):
    parts = [quant_linear("fp8", n, seed, bias) for seed, n in enumerate((256, 128, 576))]  # the last: 4.5 blocks
    x = torch.randn(5, K)
    separate = torch.cat([part(x) for part in parts], dim=-1)
    fused = fuse_linear_weights(*parts)
    assert fused is not None
    weight, fused_bias = fused
    assert isinstance(weight, Fp8BlockWeight) and weight.shape == (960, K) and weight.scale.shape == (2 + 1 + 5, 2)
    assert (fused_bias is not None) == bias
    starts = (0, 256, 384)
    for part, start in zip(parts, starts):
        assert part.weight.values.data_ptr() == weight.values.data_ptr() + start * K  # no second copy
        assert part.weight.scale.data_ptr() == weight.scale.data_ptr() + (start // 128) * 2 * 4
    torch.testing.assert_close(linear(x, weight, fused_bias), separate, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([part(x) for part in parts], dim=-1), separate, rtol=0, atol=0)


def test_the_dense_kernel_computes_a_fused_fp8_weight_as_its_parts():
    from moeserve.kernels.quant_linear import quantized_gemm

    parts = [quant_linear("fp8", n, seed) for seed, n in enumerate((128, 576))]
    x = torch.randn(3, K).bfloat16()
    separate = torch.cat([quantized_gemm(x, part.weight) for part in parts], dim=-1).float()
    weight, _ = fuse_linear_weights(*parts)
    fused = quantized_gemm(x, weight).float()
    assert torch.isfinite(fused).all()
    assert ((fused - separate).norm() / separate.norm()).item() < 1e-2  # bf16 outputs, split-K sums apart


@pytest.mark.parametrize("case", ["a part of partial blocks first", "nvfp4", "plain and quantized", "bias on one"])
def test_linears_that_cannot_share_a_gemm_stay_apart(case):
    parts = {"a part of partial blocks first": lambda: [quant_linear("fp8", 200, 0), quant_linear("fp8", 128, 1)],
             "nvfp4": lambda: [quant_linear("nvfp4", 128, 0), quant_linear("nvfp4", 128, 1)],
             "plain and quantized": lambda: [nn.Linear(K, 128, bias=False), quant_linear("fp8", 128, 1)],
             "bias on one": lambda: [quant_linear("fp8", 128, 0, bias=True), quant_linear("fp8", 128, 1)]}[case]()
    before = [dict(p.named_parameters()) for p in parts]
    assert fuse_linear_weights(*parts) is None
    for part, params in zip(parts, before):
        assert all(param is params[name] for name, param in part.named_parameters())  # nothing changed


def test_an_fp8_mlp_runs_gate_and_up_as_one_gemm_that_is_no_submodule():
    torch.manual_seed(0)
    mlp = MLP(K, 384)
    mlp.gate_proj, mlp.up_proj = quant_linear("fp8", 384, 1), quant_linear("fp8", 384, 2)
    mlp.down_proj = QuantLinear(quantized("fp8", torch.randn(K, 384) / 20), None)
    x = torch.randn(4, K)
    expected = mlp(x)
    parameters = sum(p.numel() for p in mlp.parameters())
    mlp.fuse_projections()
    assert isinstance(mlp.gate_up_weight, Fp8BlockWeight)
    mlp.gate_proj.forward = mlp.up_proj.forward = lambda x: pytest.fail("gate and up ran apart after fusion")
    assert sum(p.numel() for p in mlp.parameters()) == parameters  # the fused weight is not counted twice
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)


def test_an_fp8_mla_model_gives_the_same_logits_with_its_input_projections_fused():
    """tiny-deepseek-v3 with FP8 q_a_proj (64 rows) and kv_a_proj_with_mqa (48: a partial last block) in 32x32 blocks:
    fused into one weight of 112 rows, the logits stay those of the separate GEMMs."""
    import moeserve
    from moeserve.layers.attention.mla import MLAttention
    from moeserve.models.base import fuse_projections

    torch.manual_seed(0)
    model = moeserve.load_model("tiny-deepseek-v3", progress=False)
    attentions = [m for m in model.modules() if isinstance(m, MLAttention)]
    for attention in attentions:
        for name in ("q_a_proj", "kv_a_proj_with_mqa"):
            plain = getattr(attention, name)
            setattr(attention, name, QuantLinear(quantized("fp8", plain.weight.detach(), block=(32, 32)), None))
    input_ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        expected = model(input_ids)
        fuse_projections(model)
        assert all(isinstance(a.fused_input_proj[0], Fp8BlockWeight) for a in attentions)
        assert all(a.fused_input_proj[0].shape == (112, a.q_a_proj.in_features) for a in attentions)
        actual = model(input_ids)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
