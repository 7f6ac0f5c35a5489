"""Quantized dense linears through the grouped GEMM's kernel in dense mode, against the reference:
FP8 128x128 blocks (W8A8) and NVFP4 (W4A16), 1 to 80 rows (partial 16- and 64-row tiles), N and K not
multiples of the tiles, split-K, bias; outputs start as NaN so an unwritten element shows."""

import pytest
import torch

from moeserve.kernels import quant_linear
from moeserve.kernels.moe_gemm import FP8, NVFP4
from moeserve.kernels.quant_linear import DENSE_KERNEL_MAX_ROWS, quantized_gemm, supports
from moeserve.ops.linear import quantized_linear_reference
from moeserve.quant.formats import make_quantized_weight, quantized
from tests.kernels.poison import PoisonedTorch


def random_quantized(fmt: str, n: int, k: int, seed: int):
    torch.manual_seed(seed)
    return quantized(fmt, torch.randn(n, k) * 0.05)


@pytest.mark.parametrize("fmt,n,k", [("fp8", 200, 320), ("fp8", 64, 1024), ("nvfp4", 96, 160), ("nvfp4", 130, 64)])
@pytest.mark.parametrize("rows", [1, 5, 17, 80])
def test_dense_kernel_matches_the_reference(fmt, n, k, rows, monkeypatch):
    monkeypatch.setattr(quant_linear, "torch", PoisonedTorch())
    weight = random_quantized(fmt, n, k, seed=rows)
    x, bias = torch.randn(rows, k), torch.randn(n)
    for b in (None, bias):
        actual = quantized_gemm(x, weight, b)
        expected = quantized_linear_reference(x, weight, b)
        assert actual.shape == (rows, n) and torch.isfinite(actual).all()
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt,n,k", [("fp8", 200, 320), ("nvfp4", 130, 160)])
@pytest.mark.parametrize("rows", [1, 5, 17])
@pytest.mark.parametrize("split_k", [1, 2])
def test_the_swapped_product_matches_the_reference(fmt, n, k, rows, split_k, monkeypatch):
    """W @ x^T, the decode form: FP8 quantizing its rows in the GEMM (1 and 5 rows) or first (17), NVFP4; split-K's
    slices summed by atomics (MOESERVE_SPLIT_K=atomic)."""
    from moeserve.kernels import moe_gemm
    from moeserve.kernels.moe_gemm import GemmConfig

    monkeypatch.setattr(moe_gemm, "SPLIT_K_IN_KERNEL", False)

    weight = random_quantized(fmt, n, k, seed=rows + split_k)
    x = torch.randn(rows, k)
    config = GemmConfig(block_m=16, block_n=64, block_k=128 if fmt == "fp8" else 32, split_k=split_k, swap_ab=True)
    actual = quantized_gemm(x, weight, config=config)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, quantized_linear_reference(x, weight), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt,n,k", [("fp8", 200, 640), ("nvfp4", 130, 352)])
@pytest.mark.parametrize("rows,split_k,swap_ab,persistent", [(1, 2, True, False), (5, 3, True, True),
                                                             (17, 4, False, False)])
def test_split_k_added_up_by_the_last_slice_matches_the_reference(fmt, n, k, rows, split_k, swap_ab, persistent,
                                                                  monkeypatch):
    """The in-kernel split-K sum: each slice's partial goes to a workspace and the last slice of a tile to arrive
    adds them up in slice order (the interpreter runs the programs in order: the GPU test meets other orders); a
    persistent grid's programs each take several tiles; the tile counters end at zero for the next launch, and rows
    and columns outside the product stay as they were (NaN here)."""
    from moeserve.kernels import moe_gemm
    from moeserve.kernels.activation import quantize_fp8_activations
    from moeserve.kernels.moe_gemm import GemmConfig, dense_gemm, tile_arrivals

    monkeypatch.setattr(moe_gemm, "SPLIT_K_IN_KERNEL", True)
    weight = random_quantized(fmt, n, k, seed=rows + split_k)
    x = torch.randn(rows, k)
    config = GemmConfig(block_m=16, block_n=64, block_k=128 if fmt == "fp8" else 32, split_k=split_k, swap_ab=swap_ab,
                        persistent=persistent)
    actual = quantized_gemm(x, weight, config=config)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, quantized_linear_reference(x, weight), rtol=1e-4, atol=1e-4)
    assert not tile_arrivals(x.device, 1).any()
    wide = torch.full((rows + 3, n + 5), float("nan"))  # out as a strided view: its neighbours must stay NaN
    a, a_scale = (x, None) if fmt == "nvfp4" or rows <= 16 else quantize_fp8_activations(x)
    dense_gemm(a, a_scale, weight, wide[:rows, :n], config)
    assert torch.equal(wide[:rows, :n], actual) and wide[rows:].isnan().all() and wide[:, n:].isnan().all()


@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("rows", [1, 17])
def test_nvfp4_with_bf16_activations(rows, swap_ab):
    """bf16 rows take the path that builds the codes' bf16 from their bits (global scale on the sums)."""
    from moeserve.kernels.moe_gemm import GemmConfig

    weight = random_quantized("nvfp4", 130, 160, seed=rows)
    x = torch.randn(rows, 160).bfloat16()
    config = GemmConfig(block_m=16, block_n=64, block_k=32, swap_ab=swap_ab)
    actual = quantized_gemm(x, weight, config=config).float()
    expected = quantized_linear_reference(x.float(), weight)
    assert torch.isfinite(actual).all()
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-2


def test_bf16_activations_keep_their_dtype_and_leading_dims():
    weight = random_quantized("nvfp4", 48, 64, seed=0)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    out = quantized_gemm(x, weight)
    assert out.shape == (2, 3, 48) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), quantized_linear_reference(x, weight).float(), rtol=2e-2, atol=2e-2)


def test_split_k_is_chosen_for_few_tiles_and_long_k():
    assert quant_linear.dense_config(1, 2048, 7168, 132).split_k == 8
    assert quant_linear.dense_config(1, 24576, 1536, 132).split_k == 1
    assert quant_linear.dense_config(1, 7168, 16384, 132).split_k == 4
    assert quant_linear.dense_config(1, 3072, 2048, 132).split_k == 8  # slices of 256
    assert quant_linear.dense_config(1, 3072, 2048, 132, NVFP4).block_n == 64
    assert quant_linear.dense_config(200, 2048, 2048, 132).block_m == 64
    # every variant met by a power of two of rows (the warm-up's prefills): none compiles mid-serving
    for fmt in (FP8, NVFP4):
        for n, k in [(576, 7168), (1536, 7168), (7168, 16384), (2048, 2048)]:
            variants = {quant_linear.dense_config(rows, n, k, 132, fmt) for rows in range(1, 1025)}
            assert variants == {quant_linear.dense_config(2**i, n, k, 132, fmt) for i in range(11)}


def test_what_the_kernel_takes():
    fp8 = random_quantized("fp8", 64, 256, seed=0)
    assert supports(fp8, 1) and supports(fp8, DENSE_KERNEL_MAX_ROWS)
    assert not supports(fp8, 0) and not supports(fp8, DENSE_KERNEL_MAX_ROWS + 1)  # long prefills: dequantize once
    small_blocks = make_quantized_weight("fp8", (64, 256), (32, 32))
    assert not supports(small_blocks, 4)
    assert not supports(make_quantized_weight("nvfp4", (64, 48)), 4)  # K not a multiple of 32
    assert not supports(make_quantized_weight("fp8", (2, 64, 256)), 4)  # a stack of experts, not a linear


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_the_long_prefill_path_is_the_reference_in_the_activation_dtype(fmt):
    from moeserve.ops.linear import dequantized_linear

    weight, x, bias = random_quantized(fmt, 72, 256, seed=4), torch.randn(300, 256), torch.randn(72)
    torch.testing.assert_close(dequantized_linear(x, weight, bias), quantized_linear_reference(x, weight, bias),
                               rtol=1e-5, atol=1e-5)
    x, bias = x.bfloat16(), bias.bfloat16()
    half = dequantized_linear(x, weight, bias)
    assert half.dtype == torch.bfloat16
    expected = quantized_linear_reference(x.float(), weight, bias.float())  # the same FP8 codes: the bf16 inputs
    torch.testing.assert_close(half.float(), expected, rtol=3e-2, atol=3e-2)


def test_a_nan_in_the_activations_reaches_its_row_and_no_other():
    # Row isolation only: the interpreter's min / max keep a NaN by themselves, so the kernel's NaN-keeping
    # clamp is checked on CUDA (tests/gpu/test_quant_cuda.py, in-GEMM quantization equals quantizing first).
    weight = random_quantized("fp8", 64, 256, seed=5)
    x = torch.randn(4, 256)
    x[2, 200] = float("nan")
    out = quantized_gemm(x, weight)
    assert out[2].isnan().all()
    torch.testing.assert_close(out[[0, 1, 3]], quantized_linear_reference(x[[0, 1, 3]], weight), rtol=1e-4, atol=1e-4)


def test_which_fp8_products_go_to_cublas_block_scaling(monkeypatch):
    from moeserve.kernels import quant_linear
    from moeserve.quant.formats import quantized

    monkeypatch.setattr(quant_linear, "cublas_block_scaling_works", lambda device: True)  # as on an sm_90 build with it
    fp8 = quantized("fp8", torch.randn(256, 1024) * 0.02)
    bf16, rows = torch.bfloat16, quant_linear.CUBLAS_MIN_ROWS
    assert quant_linear.cublas_takes(fp8, rows, bf16)
    assert not quant_linear.cublas_takes(fp8, rows - 1, bf16)  # decode: the Triton kernel
    assert not quant_linear.cublas_takes(fp8, rows, torch.float16)  # checked in bf16 only
    assert not quant_linear.cublas_takes(quantized("fp8", torch.randn(256, 768) * 0.02), 4096, bf16)  # 6 K blocks
    assert not quant_linear.cublas_takes(quantized("nvfp4", torch.randn(256, 1024) * 0.02), 4096, bf16)
    assert not quant_linear.cublas_takes(quantized("fp8", torch.randn(1000, 1024) * 0.02), 4096, bf16)  # N % 16


@pytest.mark.parametrize("rows", [1, 17])  # quantized inside the GEMM (128-wide tiles); quantized first (64-wide)
def test_fp8_dense_tiles_read_their_own_weight_blocks_scale(rows):
    torch.manual_seed(rows)
    blocks = 2.0 ** torch.arange(3).repeat_interleave(128)[:, None]  # three 128-row blocks, scales 1, 2, 4 apart
    weight = quantized("fp8", torch.randn(384, 512) * 0.05 * blocks)
    x = torch.randn(rows, 512)
    actual = quantized_gemm(x, weight)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, quantized_linear_reference(x, weight), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", [
    dict(block_k=256, split_k=2, swap_ab=True), dict(block_k=64), dict(block_k=128, split_k=3)],
    ids=["k256-split2-swapped", "k64", "k128-split3"])
def test_nvfp4_bits_path_reproduces_each_weight_over_six_decades_of_block_scales(config):
    """x = I: each output is one weight, so a block scale near E4M3's subnormals, a 0.5 code flushed to 0 or a wrong
    group's scale shows as a wrong element (K = 352: the last K step is partial)."""
    from moeserve.kernels.moe_gemm import GemmConfig

    torch.manual_seed(0)
    k = 352
    w = torch.randn(96, k) * torch.logspace(-6, 0, 96)[:, None]  # with one global scale, small rows get tiny blocks
    weight = quantized("nvfp4", w)
    eye = torch.eye(k).bfloat16()
    actual = quantized_gemm(eye, weight, config=GemmConfig(block_m=16, block_n=64, **config)).float()
    expected = weight.dequantize(torch.bfloat16).t().float()
    assert (weight.block_scale.float() < 2.0**-6).any()  # subnormal E4M3 block scales are in play
    torch.testing.assert_close(actual, expected, rtol=2**-8, atol=0)
