"""The one-pass FP8 1x128 activation quantization kernel equals moeserve.quant.fp8.quantize_fp8_groups bit for bit (on
the GPU too: tests/gpu)."""

import pytest
import torch

from moeserve.kernels.activation import quantize_fp8_activations
from moeserve.quant.fp8 import quantize_fp8_groups


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The same E4M3 codes, signs of zeros included."""
    assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("rows, cols", [(1, 128), (5, 1000), (3, 2176), (0, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_equals_the_torch_quantization_bit_for_bit(rows, cols, dtype):
    x = (torch.randn(rows, cols) * torch.logspace(-6, 3, cols)).to(dtype)  # groups of very different ranges
    if rows > 1:
        x[1, 128:256] = 0  # an all-zero group
        x[1, 5] = -0.0
        x[0, 3] = -1e-30  # a negative that rounds to -0 (an H100 once gave +0 here)
    values, scales = quantize_fp8_activations(x)
    expected_values, expected_scales = quantize_fp8_groups(x)
    assert values.shape == expected_values.shape and scales.shape == expected_scales.shape
    assert_same(values, expected_values)
    assert torch.equal(scales.view(torch.int32), expected_scales.view(torch.int32))


def test_a_nan_poisons_its_group_only():
    x = torch.randn(2, 384)
    x[0, 200] = float("nan")
    values, scales = quantize_fp8_activations(x)
    assert scales[0, 1].isnan() and not scales[0, [0, 2]].isnan().any() and not scales[1].isnan().any()
    dequantized = values.float() * scales.repeat_interleave(128, dim=1)  # (the interpreter casts NaN to 384)
    assert dequantized[0, 128:256].isnan().all() and torch.isfinite(dequantized[0, :128]).all()
    assert torch.isfinite(dequantized[1]).all()


def test_padded_rows_and_column_major_scales():
    x = torch.randn(5, 640)
    values, scales = quantize_fp8_activations(x, pad_rows_to=4, column_major_scales=True)
    expected_values, expected_scales = quantize_fp8_groups(x)
    assert values.shape == (8, 640) and scales.shape == (8, 5) and scales.stride() == (1, 8)
    assert_same(values[:5], expected_values)
    assert torch.equal(scales[:5], expected_scales)
    assert (values[5:].float() == 0).all() and torch.isfinite(scales[5:]).all()


def test_a_transposed_view_is_read_as_its_values():
    x = torch.randn(256, 6).t()  # [6, 256], columns 6 elements apart
    values, scales = quantize_fp8_activations(x)
    expected_values, expected_scales = quantize_fp8_groups(x.contiguous())
    assert_same(values, expected_values)
    assert torch.equal(scales, expected_scales)
