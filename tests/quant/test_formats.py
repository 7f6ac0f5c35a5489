"""FP8 and NVFP4 bit-level behaviour: known answers, round trips and error bounds."""

import pytest
import torch

from moeserve.quant.fp8 import (dequantize_fp8_block, dequantize_fp8_groups, quantize_fp8_block,
                                quantize_fp8_groups, to_e4m3)
from moeserve.quant.nvfp4 import (dequantize_nvfp4, e2m1_codes, e2m1_values, global_scale_of, pack_nibbles,
                                  quantize_nvfp4, quantize_nvfp4_weight, unpack_nibbles)


def test_e2m1_code_table():
    values = e2m1_values(torch.arange(16, dtype=torch.uint8))
    magnitudes = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert values.tolist() == magnitudes + [-m for m in magnitudes]


@pytest.mark.parametrize("x,expected", [
    (0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),  # ties to even
    (0.2499, 0.0), (0.2501, 0.5), (0.7499, 0.5), (1.2501, 1.5), (1.7499, 1.5), (2.5001, 3.0), (3.4999, 3.0),
    (4.9999, 4.0), (5.0001, 6.0), (6.0, 6.0), (6.5, 6.0), (1e9, 6.0),  # saturation at 6
    (-0.75, -1.0), (-5.0, -4.0), (-7.0, -6.0), (0.0, 0.0),
])
def test_e2m1_rounding_at_every_midpoint(x, expected):
    assert e2m1_values(e2m1_codes(torch.tensor([x]))).item() == expected


def test_nibble_order_puts_element_2i_in_the_low_nibble():
    codes = torch.tensor([0x1, 0x2, 0xF, 0x8], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [0x21, 0x8F]
    assert unpack_nibbles(packed).tolist() == codes.tolist()


def test_nvfp4_global_and_block_scales():
    w = torch.zeros(1, 48)
    w[0, 0] = 2688.0  # amax 6 * 448: global scale 1
    w[0, 16:32] = torch.linspace(-3.0, 3.0, 16)  # block amax 3: block scale 0.5
    packed, block_scale, global_scale = quantize_nvfp4_weight(w)
    assert global_scale.item() == 1.0
    assert block_scale.float().tolist() == [[448.0, 0.5, 1.0]]  # the third block is all zero: 1.0
    assert global_scale_of(torch.tensor(0.0)).item() == 1.0
    assert dequantize_nvfp4(packed, block_scale, global_scale[..., None, None])[0, 32:].abs().sum() == 0


def test_nvfp4_round_trip_is_exact_on_representable_values():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    codes.view(8, 4, 16)[..., 0] = 7  # each block holds a 6, so its scale is recovered exactly
    block_scale = to_e4m3(torch.rand(8, 4) * 4 + 0.1)
    global_scale = torch.full((8, 1), 0.37)
    w = dequantize_nvfp4(pack_nibbles(codes), block_scale, global_scale)
    packed, scales = quantize_nvfp4(w, global_scale)
    assert torch.equal(dequantize_nvfp4(packed, scales, global_scale), w)


def test_nvfp4_tokens_far_below_one_flush_to_zero_instead_of_saturating():
    """Near 1e-38 a block scale x global scale would be subnormal and its reciprocal inf, every nonzero code 6: under
    the global scale's floor of 2^-100 such a token quantizes to zeros, and one near 1e-32 saturates on the coarse
    grid (at most 6 x 2^-109)."""
    x = torch.zeros(2, 16)
    x[0, :3] = torch.tensor([1e-38, 1e-40, -3e-39])
    x[1, :3] = torch.tensor([1e-32, -5e-33, 2e-33])
    global_scale = global_scale_of(x.abs().amax(dim=1, keepdim=True))
    assert (global_scale == 2.0**-100).all()
    packed, block_scale = quantize_nvfp4(x, global_scale)
    restored = dequantize_nvfp4(packed, block_scale, global_scale)
    assert (restored[0] == 0).all()
    assert ((restored[1] - x[1]).abs() <= 0.25 * 1e-32).all() and (restored[1, :3] != 0).all()


def test_e4m3_saturates_and_keeps_subnormals():
    x = torch.tensor([1000.0, -1000.0, 448.0, 2.0**-6, 2.0**-9, 2.0**-10, 3 * 2.0**-10, 0.1])
    assert to_e4m3(x).float().tolist() == [448.0, -448.0, 448.0, 2.0**-6, 2.0**-9, 0.0, 2.0**-8, 0.1015625]


def test_fp8_block_scales_with_partial_blocks():
    w = torch.zeros(200, 300)
    w[0, 0] = 896.0  # block (0, 0): scale 2
    w[150, 290] = -44.8  # partial block (1, 2): scale 0.1
    values, scale = quantize_fp8_block(w)
    assert values.shape == (200, 300) and scale.shape == (2, 3)
    assert scale[0, 0].item() == 2.0 and scale[1, 2].item() == pytest.approx(0.1)
    torch.testing.assert_close(dequantize_fp8_block(values, scale), w)


def test_fp8_block_error_bound_on_random_weights():
    w = torch.randn(300, 520) * torch.logspace(-2, 1, 520)  # columns over three decades
    values, scale = quantize_fp8_block(w)
    error = (dequantize_fp8_block(values, scale) - w).abs()
    per_element_scale = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :520]
    # 3 mantissa bits: half an ulp is 2^-4 relative; subnormals below 2^-6 have absolute steps of 2^-9
    assert (error <= torch.maximum(w.abs() * 2.0**-4, per_element_scale * 2.0**-10) * 1.0001).all()
    assert (error.norm() / w.norm()).item() < 0.04


def test_nvfp4_error_bound_on_random_weights():
    w = torch.randn(4, 96, 256)
    packed, block_scale, global_scale = quantize_nvfp4_weight(w)
    assert packed.shape == (4, 96, 128) and block_scale.shape == (4, 96, 16) and global_scale.shape == (4,)
    restored = dequantize_nvfp4(packed, block_scale, global_scale[:, None, None])  # one per [N, K] matrix
    step = (block_scale.float() * global_scale[:, None, None]).repeat_interleave(16, -1)
    # the coarsest E2M1 step is 2 (between 4 and 6): at most 1 unit of the block's scale off
    assert ((restored - w).abs() <= step * 1.0001).all()
    assert ((restored - w).norm() / w.norm()).item() < 0.12


def test_fp8_token_groups_round_trip_and_error():
    x = torch.randn(7, 384) * 3
    values, scales = quantize_fp8_groups(x)
    assert values.shape == (7, 384) and scales.shape == (7, 3)
    assert ((dequantize_fp8_groups(values, scales) - x).norm() / x.norm()).item() < 0.04
    partial = torch.randn(2, 200)  # one whole group and a partial one, each with its own scale
    values, scales = quantize_fp8_groups(partial)
    assert scales.shape == (2, 2)
    assert ((dequantize_fp8_groups(values, scales) - partial).norm() / partial.norm()).item() < 0.04


def test_global_scale_rank_is_checked():
    with pytest.raises(ValueError, match=r"global scale must have shape \[..., 1\] matching data of rank 2, got \[3\]"):
        quantize_nvfp4(torch.randn(3, 32), torch.ones(3))


def test_non_finite_weights_are_refused_and_activations_propagate_nan():
    bad = torch.randn(16, 32)
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_fp8_block(bad)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_nvfp4_weight(bad.masked_fill(bad.isnan(), float("inf")))
    x = torch.randn(2, 128)
    x[1, 5] = float("nan")
    values, scales = quantize_fp8_groups(x)
    restored = dequantize_fp8_groups(values, scales)
    assert restored[1].isnan().any() and not restored[0].isnan().any()
