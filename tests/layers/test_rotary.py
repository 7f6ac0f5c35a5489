"""RoPE frequencies against transformers' own functions, and the two pair layouts."""

import pytest
import torch
from transformers import DeepseekV3Config, Llama4TextConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from moeserve.config import ConfigFields, parse_rope
from moeserve.layers.rotary import RotaryEmbedding, apply_rotary

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
            beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.8)
LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=16.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)


@pytest.mark.parametrize("kind,hf_config", [
    ("yarn", DeepseekV3Config(qk_rope_head_dim=64, max_position_embeddings=163840, rope_parameters=dict(YARN))),
    ("llama3", Llama4TextConfig(head_dim=128, rope_parameters=dict(LLAMA3))),
])
def test_frequencies_match_transformers(kind, hf_config):
    expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS[kind](hf_config)
    params = YARN if kind == "yarn" else LLAMA3
    fields = ConfigFields({"rope_parameters": dict(params), "max_position_embeddings": 163840}, "test")
    rope = RotaryEmbedding(parse_rope(fields, expected_inv_freq.numel() * 2, interleaved=True, default_theta=1.0))
    torch.testing.assert_close(rope.inv_freq, expected_inv_freq.float(), rtol=1e-6, atol=0)
    assert rope.attention_factor == pytest.approx(expected_factor)


def test_interleaved_layout_is_complex_multiplication():
    x = torch.randn(5, 8)
    angles = torch.randn(5, 4)
    expected = torch.view_as_real(torch.view_as_complex(x.view(5, 4, 2)) * torch.polar(torch.ones(5, 4), angles))
    actual = apply_rotary(x, angles.cos(), angles.sin(), interleaved=True)
    torch.testing.assert_close(actual, expected.flatten(-2))


def test_half_layout_rotates_dim_i_with_dim_i_plus_half():
    x = torch.randn(5, 8)
    angles = torch.randn(5, 4)
    paired = torch.stack((x[:, :4], x[:, 4:]), dim=-1)  # pair i = (x_i, x_{i+4})
    rotated = torch.view_as_real(torch.view_as_complex(paired.contiguous()) * torch.polar(torch.ones(5, 4), angles))
    actual = apply_rotary(x, angles.cos(), angles.sin(), interleaved=False)
    torch.testing.assert_close(actual, torch.cat((rotated[..., 0], rotated[..., 1]), dim=-1))
