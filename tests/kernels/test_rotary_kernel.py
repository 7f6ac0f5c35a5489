"""The in-place RoPE kernel against apply_rotary, reading angles from the table the runner builds."""

import pytest
import torch

from moeserve.config import RopeConfig
from moeserve.kernels.rotary import rope_
from moeserve.layers.rotary import RotaryEmbedding, apply_rotary, prepare_rotary_tables

BF16_ULP = dict(rtol=2**-7, atol=1e-6)  # the kernel may fuse a multiply-add the torch ops round twice


def reference(x, positions, rotary, interleaved):
    cos, sin = rotary(positions)
    if x.dim() == 3:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return apply_rotary(x, cos, sin, interleaved)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_matches_reference_on_gqa_shapes(interleaved, dtype):
    rotary = RotaryEmbedding(RopeConfig(kind="default", dim=64, theta=10000.0, interleaved=interleaved))
    table = rotary.build_table(300, torch.device("cpu"))
    positions = torch.randint(0, 300, (7,))
    q, k = torch.randn(7, 20, 64).to(dtype), torch.randn(7, 3, 64).to(dtype)  # 20 heads: two head blocks
    want_q, want_k = reference(q, positions, rotary, interleaved), reference(k, positions, rotary, interleaved)
    rope_(q, k, positions, table, interleaved)
    tol = BF16_ULP if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q, want_q, **tol)
    torch.testing.assert_close(k, want_k, **tol)


def test_rope_rotates_mla_views_in_place_and_leaves_the_rest():
    rope = RopeConfig(dim=64, theta=10000.0, kind="yarn", factor=40.0, original_max_position_embeddings=4096,
                      beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707, interleaved=True)
    rotary = RotaryEmbedding(rope)
    table = rotary.build_table(64, torch.device("cpu"))
    positions = torch.randint(0, 64, (5,))
    q = torch.randn(5, 16 * 192).to(torch.bfloat16)  # [T, H * (nope 128 + rope 64)]
    kv = torch.randn(5, 512 + 64).to(torch.bfloat16)  # [c_kv | k_pe]
    q_nope, q_pe = q.unflatten(-1, (16, -1)).split([128, 64], dim=-1)
    c_kv, k_pe = kv.split([512, 64], dim=-1)
    before_nope, before_latent = q_nope.clone(), c_kv.clone()
    want_q, want_k = reference(q_pe, positions, rotary, True), reference(k_pe, positions, rotary, True)
    rope_(q_pe, k_pe, positions, table, True)
    torch.testing.assert_close(q_pe, want_q, **BF16_ULP)
    torch.testing.assert_close(k_pe, want_k, **BF16_ULP)
    assert torch.equal(q_nope, before_nope) and torch.equal(c_kv, before_latent)


def test_table_rows_are_the_angles_forward_computes():
    rotary = RotaryEmbedding(RopeConfig(kind="default", dim=32, theta=500000.0, interleaved=False))
    positions = torch.tensor([0, 5, 99])
    cos, sin = rotary(positions)
    assert torch.equal(rotary.build_table(100, torch.device("cpu"))[positions], torch.cat((cos, sin), -1))


def test_rope_refuses_mismatched_shapes():
    table = torch.zeros(8, 64)
    with pytest.raises(ValueError, match="equal even last dims"):
        rope_(torch.zeros(2, 4, 64), torch.zeros(2, 1, 32), torch.zeros(2, dtype=torch.long), table, False)


def test_layers_with_the_same_angles_share_one_table():
    from torch import nn

    same = RopeConfig(kind="default", dim=32, theta=10000.0, interleaved=False)
    other = RopeConfig(kind="default", dim=32, theta=500000.0, interleaved=False)
    model = nn.ModuleList([RotaryEmbedding(same), RotaryEmbedding(same), RotaryEmbedding(other)])
    prepare_rotary_tables(model, 16, torch.device("cpu"))
    assert model[0].table is model[1].table and model[2].table is not model[0].table
    assert model[0].table.shape == (16, 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_with_qwen3_head_norms_matches_norm_then_rotate(dtype):
    from moeserve.layers.norm import RMSNorm
    from moeserve.ops.rotary import rotate_query_key

    rotary = RotaryEmbedding(RopeConfig(kind="default", dim=128, theta=1000000.0, interleaved=False))
    q_norm, k_norm = RMSNorm(128, 1e-6).to(dtype), RMSNorm(128, 1e-6).to(dtype)
    for norm in (q_norm, k_norm):
        norm.weight.data = (torch.rand(128) + 0.5).to(dtype)
    positions = torch.randint(0, 40, (6,))
    q, k = (torch.randn(6, 20, 128) * 2).to(dtype), (torch.randn(6, 4, 128) * 2).to(dtype)
    want_q, want_k = rotate_query_key(q, k, positions, rotary, False, q_norm, k_norm)  # CPU: the torch path
    rope_(q, k, positions, rotary.build_table(40, torch.device("cpu")), False, (q_norm.weight, k_norm.weight), 1e-6)
    tol = dict(rtol=2**-6, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)  # two roundings
    torch.testing.assert_close(q, want_q, **tol)
    torch.testing.assert_close(k, want_k, **tol)
