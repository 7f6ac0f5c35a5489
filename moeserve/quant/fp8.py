"""FP8 E4M3: DeepSeek-style block weights and per-token-group activations.

Weights [..., N, K] are cut into blocks of `block` (default 128x128; the last blocks may be partial);
each block has one fp32 scale, a multiplier: w ~= values * scale, scale = amax(block) / 448
(DeepSeek's `weight_scale_inv` and compressed-tensors' `weight_scale` are both this multiplier).
Activations [T, K] get one scale per token per group of 128 channels, computed at run time.
"""

from dataclasses import dataclass

import torch

E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9
_TINY = 1e-12  # amax floor: an all-zero block gets a tiny scale and exact zeros, never 0/0


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E4M3 value (ties to even), saturating at +-448 (torch's cast would give NaN); NaN -> 0x7F
    whatever its sign, as the GPU's conversion gives it (a CPU's division leaves NaNs negative at times)."""
    clamped = x.clamp(-E4M3_MAX, E4M3_MAX)
    return torch.where(clamped.isnan(), clamped.abs(), clamped).to(torch.float8_e4m3fn)


def exact_div(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / divisor, correctly rounded on every device (CUDA divides by a Python number through its
    reciprocal, one ulp off at times: scales must not depend on where a model was quantized)."""
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)  # a fill, not a copy: CUDA graphs capture it


def block_scales(amax: torch.Tensor) -> torch.Tensor:
    return exact_div(amax.float().clamp(min=_TINY), E4M3_MAX)


def _blocked(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[..., N, K] zero-padded to whole blocks, viewed as [..., N/bn, bn, K/bk, bk]."""
    bn, bk = block
    n, k = w.shape[-2:]
    padded = torch.nn.functional.pad(w, (0, -k % bk, 0, -n % bn))
    return padded.unflatten(-1, (-1, bk)).unflatten(-3, (-1, bn))


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = (128, 128)):
    """w [..., N, K] -> (values float8_e4m3fn [..., N, K], scale fp32 [..., ceil(N/bn), ceil(K/bk)])."""
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantize a weight with NaN or inf values to FP8")
    blocks = _blocked(w.float(), block)  # [..., nN, bn, nK, bk]
    scale = block_scales(blocks.abs().amax(dim=(-3, -1)))  # [..., nN, nK]
    values = to_e4m3(blocks / scale[..., :, None, :, None])
    n, k = w.shape[-2:]
    return values.flatten(-4, -3).flatten(-2, -1)[..., :n, :k].contiguous(), scale


def dequantize_fp8_block(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = values.shape[-2:]
    expanded = scale.repeat_interleave(block[0], dim=-2)[..., :n, :].repeat_interleave(block[1], dim=-1)[..., :k]
    return (values.float() * expanded).to(dtype)


def quantize_fp8_groups(x: torch.Tensor, group: int = 128):
    """x [T, K] -> (values float8_e4m3fn [T, K], scales fp32 [T, ceil(K/group)]); a last partial group
    has its own scale. NaN in a group makes that group's scale and values NaN (it propagates)."""
    k = x.shape[-1]
    padded = torch.nn.functional.pad(x.float(), (0, -k % group))
    groups = padded.unflatten(-1, (padded.shape[-1] // group, group))  # [T, ceil(K/g), g]
    scales = block_scales(groups.abs().amax(dim=-1))
    return to_e4m3(groups / scales[..., None]).flatten(-2)[..., :k].contiguous(), scales


def dequantize_fp8_groups(values: torch.Tensor, scales: torch.Tensor, group: int = 128,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    k = values.shape[-1]
    expanded = scales.repeat_interleave(group, dim=-1)[..., :k]
    return (values.float() * expanded).to(dtype)


def fp8_group_round_trip(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """x through FP8 1x`group` quantization and back (fp32): what a W8A8 kernel multiplies."""
    return dequantize_fp8_groups(*quantize_fp8_groups(x, group), group)


@dataclass
class Fp8Activations:
    """Activations already quantized 1x128 per token (as quantize_fp8_groups gives them: a W8A8 GEMM's A operand), and
    the dtype they stand for. An FP8 expert-parallel dispatch hands its received tokens on in this form, so FP8 experts
    multiply them as they arrived instead of quantizing them again."""

    values: torch.Tensor  # [T, K] float8_e4m3fn (rows may be strided, elements contiguous)
    scales: torch.Tensor  # [T, ceil(K/128)] float32
    dtype: torch.dtype = torch.bfloat16

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def device(self) -> torch.device:
        return self.values.device

    def dequantize(self) -> torch.Tensor:
        return dequantize_fp8_groups(self.values, self.scales, 128, self.dtype)
