"""The small fused ops on the GPU at DeepSeek-V2-Lite widths, against their torch specifications:
RMSNorm with and without the residual add, in-place RoPE on MLA's strided views, SwiGLU's activation,
and MLA/MLP projections fused into one GEMM."""

import pytest
import torch
import torch.nn.functional as F

from moeserve.config import RopeConfig
from moeserve.layers.rotary import RotaryEmbedding, apply_rotary
from moeserve.ops import activation, norm, rotary

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BF16 = dict(rtol=2**-7, atol=1e-5)
NORM_BF16 = dict(rtol=2**-6, atol=1e-5)  # the kernel and the reference reduce and take the root in fp32 differently:
# an output can land two bf16 ulps from the reference's (1 element of 614,400, 0.85% off, on an H100)


def test_rms_norm_and_add_rms_norm_on_gpu():
    x = torch.randn(300, 2048, device="cuda").bfloat16() * 3
    residual = torch.randn(300, 2048, device="cuda").bfloat16() * 10
    weight = (torch.rand(2048, device="cuda") + 0.5).bfloat16()
    out = norm.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(out, norm.rms_norm_reference(x, weight, 1e-6), **NORM_BF16)
    out, total = norm.add_rms_norm(x, residual, weight, 1e-6)
    want, want_total = norm.add_rms_norm_reference(x, residual, weight, 1e-6)
    assert torch.equal(total, want_total)
    torch.testing.assert_close(out, want, **NORM_BF16)
    heads = torch.randn(7, 32, 128, device="cuda").bfloat16()  # Qwen3's per-head q/k norm
    torch.testing.assert_close(norm.rms_norm(heads, weight[:128], 1e-6),
                               norm.rms_norm_reference(heads, weight[:128], 1e-6), **NORM_BF16)


def test_rope_in_place_on_mla_views_on_gpu():
    rope = RopeConfig(kind="yarn", theta=10000.0, dim=64, interleaved=True, factor=40.0,
                      original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707)
    module = RotaryEmbedding(rope)
    positions = torch.randint(0, 4096, (100,), device="cuda")
    q = torch.randn(100, 16 * 192, device="cuda").bfloat16()
    kv = torch.randn(100, 576, device="cuda").bfloat16()
    q_pe, k_pe = q.unflatten(-1, (16, 192))[..., 128:], kv[:, 512:]
    cos, sin = module(positions)
    want_q = apply_rotary(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), True)
    want_k = apply_rotary(k_pe, cos, sin, True)
    module.table = module.build_table(4096, torch.device("cuda"))
    got_q, got_k = rotary.rotate_query_key(q_pe, k_pe, positions, module, True)
    assert got_q.data_ptr() == q_pe.data_ptr()  # in place
    torch.testing.assert_close(got_q, want_q, **BF16)
    torch.testing.assert_close(got_k, want_k, **BF16)


def test_silu_and_mul_rounds_as_eager_bf16_on_gpu():
    gate_up = torch.randn(64, 2 * 1408, device="cuda").bfloat16() * 3
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(activation.silu_and_mul(gate_up), F.silu(gate) * up, **BF16)


def test_fused_projections_give_the_separate_results_on_gpu():
    from moeserve.layers.mlp import MLP

    mlp = MLP(2048, 1408).cuda().bfloat16()
    for p in mlp.parameters():
        p.data.normal_(0, 0.02)
    x = torch.randn(33, 2048, device="cuda").bfloat16()
    want = mlp(x)
    mlp.fuse_projections()
    assert mlp.gate_up_weight is not None and mlp.gate_proj.weight.data_ptr() == mlp.gate_up_weight.data_ptr()
    torch.testing.assert_close(mlp(x), want, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("rows", [1, 10, 64, 256, 682, 16384])  # one program up to 64 pairs, chunked beyond
def test_triton_layout_equals_reference_on_gpu(rows):
    from moeserve.kernels.moe_layout import block_layout, block_layout_reference

    slots = torch.rand(rows, 64, device="cuda").argsort(dim=1)[:, :6].to(torch.int32)  # 6 distinct experts a row
    got, want = block_layout(slots, 64, 16), block_layout_reference(slots, 64, 16)
    for name in ("sorted_rows", "block_expert", "num_padded", "counts"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
