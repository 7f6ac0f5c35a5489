"""Quantized models on CUDA: the reference path (weights dequantized on the GPU) gives what it gives
on the CPU."""

import pytest
import torch

import moeserve
from moeserve.kernels.moe_gemm import GemmConfig
from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 17, 40)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("preset", ["tiny-deepseek-v3", "tiny-qwen3-moe"])
def test_quantized_logits_and_greedy_tokens_on_cuda_equal_cpu(preset, fmt):
    input_ids = torch.randint(3, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    cpu_model = moeserve.load_model(preset, quantization=fmt, progress=False)
    cuda_model = moeserve.load_model(preset, device="cuda", quantization=fmt, progress=False)
    for (name, a), (_, b) in zip(cpu_model.named_parameters(), cuda_model.named_parameters()):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.cpu().reshape(-1).view(torch.uint8)), name
    actual, expected = cuda_model(input_ids.cuda()).cpu(), cpu_model(input_ids)
    if fmt == "fp8":
        # W8A8 on both devices, linears and experts alike: every layer's input is rounded to FP8 (steps of
        # 1/16), so an activation whose rounding flips under another summation order moves the next layer's
        # inputs and the difference grows through the layers (tiny random models: ~17% of the logits' norm
        # between the devices). Each device's W8A8 error against the unquantized model is what must hold.
        unquantized = moeserve.load_model(preset, progress=False)(input_ids)
        cpu_error = (expected - unquantized).norm() / unquantized.norm()
        cuda_error = (actual - unquantized).norm() / unquantized.norm()
        assert torch.isfinite(actual).all() and cuda_error < 1.5 * cpu_error + 0.02, (cuda_error, cpu_error)
        return
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    cpu = [o.outputs[0].token_ids for o in LLM(preset, device="cpu", quantization=fmt).generate(PROMPTS, GREEDY)]
    cuda = [o.outputs[0].token_ids for o in LLM(preset, device="cuda", quantization=fmt).generate(PROMPTS, GREEDY)]
    assert cuda == cpu


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("config", [GemmConfig(16, 64, 128, swap_ab=True), GemmConfig(16, 128, 128, split_k=4, swap_ab=True),
                                    GemmConfig(16, 128, 256, split_k=2)], ids=["swapped", "swapped-split4", "k256"])
def test_dense_quantized_kernel_variants_at_deepseek_v3_shapes(fmt, config):
    """The decode variants the probes time, each against the reference (a wrong one must never be timed as fast)."""
    from moeserve.kernels.quant_linear import quantized_gemm
    from moeserve.ops.linear import quantized_linear_reference
    from moeserve.quant.formats import quantized

    if fmt == "fp8" and config.block_k != 128:
        pytest.skip("FP8 steps one 128-wide scale block at a time")
    for n, k in [(1536, 7168), (7168, 16384)]:
        weight = quantized(fmt, torch.randn(n, k, device="cuda") * 0.02)
        x = torch.randn(5, k, device="cuda").bfloat16()
        actual = quantized_gemm(x, weight, config=config).float()
        expected = quantized_linear_reference(x, weight).float()
        assert torch.isfinite(actual).all()
        assert (actual - expected).norm() <= 1e-2 * expected.norm(), (n, k)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_split_k_added_up_in_the_kernel_equals_the_atomic_sum_at_decode_shapes(fmt, rows, monkeypatch):
    """The last slice of each tile adds up the slices' partials (one kernel instead of zeros, atomics and a copy): the
    reference's result into an output of NaNs, the same bits launch after launch (slice order, whoever arrives last),
    counters left at 0; V2-Lite's and V3's decode shapes at dense_config's split (8 slices for most); under a CUDA
    graph, captured with the counters made before it, replayed; a capture before any counters exist sums by atomics."""
    from moeserve.kernels import moe_gemm
    from moeserve.kernels.device import multiprocessors
    from moeserve.kernels.quant_linear import dense_config, quantized_gemm
    from moeserve.ops.linear import quantized_linear_reference
    from moeserve.quant.formats import quantized

    for n, k in [(3072, 2048), (576, 2048), (2048, 2816), (2048, 7168), (7168, 16384)]:
        weight = quantized(fmt, torch.randn(n, k, device="cuda") * 0.02)
        x = torch.randn(rows, k, device="cuda").bfloat16()
        config = dense_config(rows, n, k, multiprocessors(x.device), moe_gemm.weight_format(weight))
        monkeypatch.setattr(moe_gemm, "SPLIT_K_IN_KERNEL", False)
        atomic = quantized_gemm(x, weight).float()
        monkeypatch.setattr(moe_gemm, "SPLIT_K_IN_KERNEL", True)

        def launch(out):
            moe_gemm.dense_gemm(x, None, weight, out.fill_(float("nan")), config)
            return out

        runs = [launch(torch.empty(rows, n, dtype=x.dtype, device="cuda")).clone() for _ in range(20)]
        expected = quantized_linear_reference(x, weight).float()
        assert torch.isfinite(runs[0]).all() and all(torch.equal(r, runs[0]) for r in runs), (n, k, config)
        assert (runs[0].float() - expected).norm() <= 1e-2 * expected.norm(), (n, k)
        assert (runs[0].float() - atomic).norm() <= 1e-2 * atomic.norm(), (n, k)
        assert not moe_gemm.tile_arrivals(x.device, 1).any()
        out = torch.empty(rows, n, dtype=x.dtype, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            moe_gemm.dense_gemm(x, None, weight, out, config)
        for _ in range(3):
            out.fill_(float("nan"))
            graph.replay()
            assert torch.equal(out, runs[0]), (n, k)
    monkeypatch.setattr(moe_gemm, "_arrivals", {})  # a capture with no counters made before it sums with atomics
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_gemm.dense_gemm(x, None, weight, out, config)
    assert not moe_gemm._arrivals[x.device]
    out.fill_(float("nan"))
    graph.replay()
    assert (out.float() - atomic).norm() <= 1e-3 * atomic.norm()


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("rows", [1, 7, 64, 256])
def test_dense_quantized_kernel_at_deepseek_v3_shapes(fmt, rows):
    from moeserve.kernels.quant_linear import quantized_gemm
    from moeserve.ops.linear import quantized_linear_reference
    from moeserve.quant.formats import quantized

    for n, k in [(1536, 7168), (7168, 16384), (576, 7168)]:
        weight = quantized(fmt, torch.randn(n, k, device="cuda") * 0.02)
        x = torch.randn(rows, k, device="cuda").bfloat16()
        actual = quantized_gemm(x, weight).float()
        expected = quantized_linear_reference(x, weight).float()
        assert torch.isfinite(actual).all()
        assert (actual - expected).norm() <= 1e-2 * expected.norm(), (n, k)


def test_in_gemm_fp8_quantization_equals_quantizing_first_bit_for_bit():
    """The dense kernel's in-GEMM activation quantization (exact divisions) gives the codes and scales that
    quantize_fp8_groups gives, so the two paths' outputs are bit-identical; a NaN stays in its row."""
    from moeserve.kernels.moe_gemm import dense_gemm
    from moeserve.quant.formats import quantized
    from moeserve.quant.fp8 import quantize_fp8_groups

    weight = quantized("fp8", torch.randn(1536, 7168, device="cuda") * 0.02)
    x = (torch.randn(16, 7168, device="cuda") * torch.logspace(-3, 2, 16, device="cuda")[:, None]).bfloat16()
    x[5, 1000] = float("nan")
    config = GemmConfig(block_m=16, block_n=64, block_k=128)
    in_gemm, first = (torch.empty(16, 1536, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    dense_gemm(x, None, weight, in_gemm, config)
    dense_gemm(*quantize_fp8_groups(x), weight, first, config)
    assert in_gemm[5].isnan().all() and first[5].isnan().all()
    rows = [r for r in range(16) if r != 5]
    assert torch.isfinite(in_gemm[rows]).all()
    assert torch.equal(in_gemm[rows], first[rows])


def test_activation_quantization_kernel_equals_torch_bit_for_bit_on_cuda():
    from moeserve.kernels.activation import quantize_fp8_activations
    from moeserve.quant.fp8 import quantize_fp8_groups

    x = (torch.randn(37, 7168, device="cuda") * torch.logspace(-4, 3, 7168, device="cuda")).bfloat16()
    x[3, 500] = float("nan")
    x[4, :256] = 0
    values, scales = quantize_fp8_activations(x)
    expected_values, expected_scales = quantize_fp8_groups(x)
    assert torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))
    assert torch.equal(scales.isnan(), expected_scales.isnan()) and scales[3, 3].isnan()
    assert torch.equal(scales.nan_to_num(), expected_scales.nan_to_num())


def test_cublas_block_scaled_fp8_equals_the_reference():
    """cuBLAS's DeepSeek block scaling (rows padded to 4, column-major activation scales) computes W8A8 as the
    reference does; a K it computes wrongly (not a multiple of 512) never reaches it."""
    from moeserve.kernels import quant_linear
    from moeserve.ops.linear import quantized_linear, quantized_linear_reference
    from moeserve.quant.formats import quantized

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("cuBLAS block scaling is used on sm_90 only")
    assert quant_linear.cublas_block_scaling_works(torch.device("cuda", torch.cuda.current_device()))
    for n, k in [(576, 7168), (24576, 1536), (7168, 16384), (1008, 512)]:  # 576, 1008: a partial last N block
        blocks = 2.0 ** (torch.arange(-(-n // 128), device="cuda") % 6).repeat_interleave(128)[:n, None]  # scales apart
        weight = quantized("fp8", torch.randn(n, k, device="cuda") * 0.02 * blocks)
        bias = torch.randn(n, device="cuda").bfloat16()
        for rows in (128, 130, 1027):
            groups = 2.0 ** (torch.arange(k // 128, device="cuda") % 5).repeat_interleave(128)  # activation scales apart
            x = (torch.randn(rows, k, device="cuda") * groups).bfloat16()
            assert quant_linear.cublas_takes(weight, rows, x.dtype)
            actual = quantized_linear(x, weight, bias).float()
            expected = quantized_linear_reference(x, weight, bias).float()
            assert actual.shape == (rows, n) and torch.isfinite(actual).all()
            assert (actual - expected).norm() <= 1e-2 * expected.norm(), (n, k, rows)
    for n, k in [(256, 768), (1000, 512)]:  # 6 K blocks; N not a multiple of 16
        odd = quantized("fp8", torch.randn(n, k, device="cuda") * 0.02)
        assert not quant_linear.cublas_takes(odd, 1024, torch.bfloat16)
        x = torch.randn(1024, k, device="cuda").bfloat16()
        expected = quantized_linear_reference(x, odd).float()
        assert (quantized_linear(x, odd).float() - expected).norm() <= 1e-2 * expected.norm()


@pytest.mark.parametrize("config", [GemmConfig(16, 64, 256, split_k=2, swap_ab=True), GemmConfig(16, 128, 128),
                                    GemmConfig(16, 64, 64)], ids=["k256-split2-swapped", "k128", "k64"])
def test_nvfp4_ptx_conversion_reproduces_each_weight_over_six_decades_of_block_scales(config):
    """x = I through the PTX conversion (K = 352: a partial last step), block scales down to E4M3's subnormals."""
    from moeserve.kernels.quant_linear import quantized_gemm
    from moeserve.quant.formats import quantized

    torch.manual_seed(0)
    k = 352
    weight = quantized("nvfp4", torch.randn(96, k, device="cuda") * torch.logspace(-6, 0, 96, device="cuda")[:, None])
    actual = quantized_gemm(torch.eye(k, device="cuda").bfloat16(), weight, config=config).float()
    expected = weight.dequantize(torch.bfloat16).t().float()
    assert (weight.block_scale.float() < 2.0**-6).any()
    torch.testing.assert_close(actual, expected, rtol=2**-8, atol=0)
