"""NVFP4: E2M1 values in 16-element blocks with an E4M3 scale each, and one fp32 global scale.

Bit layout (NVIDIA's NVFP4, ModelOpt checkpoints):
- E2M1 code: bit 3 sign, bits 0-2 magnitude index into {0, 0.5, 1, 1.5, 2, 3, 4, 6}.
- Two codes per byte: element 2i in the low nibble, element 2i + 1 in the high nibble.
- One E4M3 block scale per 16 consecutive elements along K; one fp32 global scale per tensor.
- global = amax(W) / (6 * 448), at least 2^-100; block scale = e4m3(amax(block) / (6 * global)), at least 2^-9 (the
  smallest E4M3 subnormal), 1.0 for an all-zero block; codes = round_to_e2m1(w * r), r = 1 / (block * global)
  correctly rounded once per block (as NVIDIA's quantizers multiply by the reciprocal; a division per value costs a
  GPU kernel ten times the instructions), round to nearest with ties to the even code, saturating at 6.
- Dequantize: w = value(code) * float(block scale) * global.
"""

import functools
from dataclasses import dataclass

import torch

from moeserve.quant.fp8 import E4M3_MAX, E4M3_MIN_SUBNORMAL, exact_div, to_e4m3

E2M1_MAX = 6.0
BLOCK = 16
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Midpoints between consecutive magnitudes. A tie goes to the even code: down when the lower code is
# even (0.25 -> 0, 1.25 -> 1, 2.5 -> 2, 5 -> 4), up when it is odd (0.75 -> 1, 1.75 -> 2, 3.5 -> 4).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """x (already scaled) -> uint8 codes 0-15, round to nearest even, saturating at +-6. NaN -> 0."""
    magnitude = x.abs()
    index = torch.zeros_like(magnitude, dtype=torch.uint8)
    for lower, midpoint in enumerate(_MIDPOINTS):
        above = magnitude > midpoint if lower % 2 == 0 else magnitude >= midpoint
        index += above.to(torch.uint8)
    return index | ((x < 0).to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    magnitude = e2m1_table(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -magnitude, magnitude)


@functools.cache
def e2m1_table(device: torch.device) -> torch.Tensor:
    """E2M1_VALUES on `device`, copied there once (a copy per call would sync the GPU every MoE layer)."""
    return E2M1_VALUES.to(device)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes: element 2i low nibble, 2i + 1 high nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


MIN_GLOBAL_SCALE = 2.0**-100  # block scale (>= 2^-9) x global scale stays >= 2^-109: its reciprocal is finite


def global_scale_of(amax: torch.Tensor) -> torch.Tensor:
    """amax / (6 * 448), at least MIN_GLOBAL_SCALE (an amax under ~2e-27 quantizes as if it were that, coarsely,
    instead of its reciprocal overflowing to inf and every code to 6); 1.0 where amax is 0 (NaN stays NaN)."""
    amax = amax.float()
    return torch.where(amax == 0, torch.ones_like(amax),
                       exact_div(amax, E2M1_MAX * E4M3_MAX).clamp(min=MIN_GLOBAL_SCALE))


def _check_global(global_scale: torch.Tensor, data: torch.Tensor) -> None:
    if global_scale.dim() != data.dim() or global_scale.shape[-1] != 1:
        raise ValueError(f"the NVFP4 global scale must have shape [..., 1] matching data of rank {data.dim()}, "
                         f"got {list(global_scale.shape)}")


def quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor):
    """x [..., K] (K a multiple of 16), global_scale [..., 1] (same rank as x; at least MIN_GLOBAL_SCALE, as
    global_scale_of makes it) -> (packed uint8 [..., K/2], block scales float8_e4m3fn [..., K/16])."""
    if x.shape[-1] % BLOCK:
        raise ValueError(f"NVFP4 needs the reduced dimension to be a multiple of {BLOCK}, got {x.shape[-1]}")
    _check_global(global_scale, x)
    blocks = x.float().unflatten(-1, (x.shape[-1] // BLOCK, BLOCK))  # [..., K/16, 16]
    global_scale = global_scale.float()
    amax = blocks.abs().amax(dim=-1)
    raw = (amax / (E2M1_MAX * global_scale)).clamp(min=E4M3_MIN_SUBNORMAL)
    block_scale = to_e4m3(torch.where(amax == 0, torch.ones_like(raw), raw))
    divisor = block_scale.float() * global_scale
    scaled = blocks * (torch.ones((), device=x.device) / divisor)[..., None]  # tensor / tensor: correctly rounded
    return pack_nibbles(e2m1_codes(scaled).flatten(-2)), block_scale


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed [..., K/2], block_scale [..., K/16], global_scale [..., 1] (same rank)."""
    _check_global(global_scale, packed)
    values = e2m1_values(unpack_nibbles(packed)).unflatten(-1, (block_scale.shape[-1], BLOCK))  # [..., K/16, 16]
    scale = block_scale.float() * global_scale.float()  # [..., K/16]
    return (values * scale[..., None]).flatten(-2).to(dtype)


def quantize_nvfp4_weight(w: torch.Tensor):
    """w [..., N, K] -> (packed [..., N, K/2], block scales [..., N, K/16], global scale fp32 [...]),
    one global scale per matrix."""
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantize a weight with NaN or inf values to NVFP4")
    global_scale = global_scale_of(w.abs().amax(dim=(-2, -1)))
    packed, block_scale = quantize_nvfp4(w, global_scale[..., None, None])
    return packed, block_scale, global_scale


@dataclass
class Nvfp4Activations:
    """Tokens quantized to NVFP4 one row each (global scale per token), in the nvfp4 token format's byte rows: H/2
    bytes of codes, H/16 E4M3 block scales, one fp32 global scale. An NVFP4 expert-parallel dispatch hands its
    received tokens on in this form, where they arrived, so that the experts' first GEMM turns them into bf16 in
    registers instead of a pass writing them out in bf16 first."""

    rows: torch.Tensor  # uint8 [T, >= H/2 + H/16 + 4]: rows may be strided, bytes contiguous
    hidden: int
    dtype: torch.dtype = torch.bfloat16  # what they stand for
    rows_in_use: torch.Tensor | None = None  # bool [T]: only these hold tokens (a kernel may leave the others unmade)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows.shape[0], self.hidden))

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def packed(self) -> torch.Tensor:  # [T, H/2] uint8
        return self.rows[:, : self.hidden // 2]

    @property
    def block_scales(self) -> torch.Tensor:  # [T, H/16] float8_e4m3fn
        return self.rows[:, self.hidden // 2 : self.hidden // 2 + self.hidden // BLOCK].view(torch.float8_e4m3fn)

    @property
    def global_scales(self) -> torch.Tensor:  # [T, 1] float32
        start = self.hidden // 2 + self.hidden // BLOCK
        return self.rows[:, start : start + 4].view(torch.float32)

    def dequantize(self) -> torch.Tensor:
        """[T, H] in dtype, every row, rows_in_use or not (the torch form; kernels.ep_transport.nvfp4_tokens is the
        one-kernel one, which skips rows not in use)."""
        return dequantize_nvfp4(self.packed, self.block_scales, self.global_scales, self.dtype)
