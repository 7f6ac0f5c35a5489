"""Rotary position embeddings: default, llama3 and YaRN frequencies; pair-interleaved or half layouts."""

import math

import torch
from torch import nn

from moeserve.config import RopeConfig
from moeserve.ops.rotary import apply_rotary

__all__ = ["RotaryEmbedding", "apply_rotary", "prepare_rotary_tables", "yarn_mscale"]


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [dim/2]


def llama3_inv_freq(rope: RopeConfig) -> torch.Tensor:
    inv_freq = default_inv_freq(rope.theta, rope.dim)
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_inv_freq(rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071) as transformers computes it: ramp between interpolated and original."""
    dim, base, factor = rope.dim, rope.theta, rope.factor

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """positions -> (cos, sin), each [..., dim/2] in fp32, already multiplied by the attention factor.

    inv_freq is a plain fp32 tensor, not a buffer: casting the model to bf16 must not round it. So is
    `table` [positions, dim] (cos | sin of every position up to the model length), which
    `prepare_rotary_tables` builds once for the fused kernel, shared by every layer with the same angles.
    """

    def __init__(self, rope: RopeConfig):
        super().__init__()
        self.attention_factor = 1.0
        with torch.device("cpu"):  # also when the model is built on the meta device
            if rope.kind == "default":
                self.inv_freq = default_inv_freq(rope.theta, rope.dim)
            elif rope.kind == "llama3":
                self.inv_freq = llama3_inv_freq(rope)
            else:
                self.inv_freq, self.attention_factor = yarn_inv_freq(rope)
        self.table: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # [..., dim/2]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


    def build_table(self, num_positions: int, device: torch.device) -> torch.Tensor:
        cos, sin = self(torch.arange(num_positions, device=device))
        return torch.cat((cos, sin), dim=-1)  # [N, dim]: the same fp32 values forward computes


def prepare_rotary_tables(model: nn.Module, num_positions: int, device: torch.device) -> None:
    """Give every RotaryEmbedding its cos|sin table for positions < num_positions (one per distinct angle set)."""
    tables = {}
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            key = (tuple(module.inv_freq.tolist()), module.attention_factor)
            if key not in tables:
                tables[key] = module.build_table(num_positions, device)
            module.table = tables[key]
