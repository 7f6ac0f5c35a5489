"""Multi-head latent attention (DeepSeek-V2/V3), in the plain per-head form and the absorbed form.

Plain: up-project the latent to per-head keys and values, then ordinary attention (prefill, and what
Hugging Face computes). Absorbed: fold W_UK into the query and W_UV into the output, so attention runs
as MQA over the latent itself, [c_kv | k_pe], which is all the KV cache has to hold (decode).
"""

import torch
from torch import nn

from moeserve.config import MLAConfig, RopeConfig
from moeserve.layers.attention.dense import causal_mask, dense_attention
from moeserve.layers.norm import RMSNorm
from moeserve.layers.rotary import RotaryEmbedding, apply_rotary, yarn_mscale

LATENT_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm ignore rms_norm_eps in the reference


def mla_softmax_scale(mla: MLAConfig, rope: RopeConfig) -> float:
    """qk_head_dim^-0.5, times mscale^2 for YaRN checkpoints that set mscale_all_dim."""
    scale = mla.qk_head_dim**-0.5
    if rope.kind != "default" and rope.mscale_all_dim:
        scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


class MLAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mla: MLAConfig, rope: RopeConfig, bias: bool):
        super().__init__()
        self.mla = mla
        self.num_heads = num_heads
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, num_heads * mla.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden_size, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, num_heads * mla.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, mla.latent_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, num_heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * mla.v_head_dim, hidden_size, bias=bias)
        self.rotary = RotaryEmbedding(rope)
        self.interleaved = rope.interleaved
        self.scale = mla_softmax_scale(mla, rope)

    def project_q(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mla.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.unflatten(-1, (self.num_heads, self.mla.qk_head_dim))  # [..., Hq, P + R]
        q_nope, q_pe = q.split([self.mla.qk_nope_head_dim, self.mla.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rotary(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), self.interleaved)

    def project_latent(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached part: c_kv [..., L] (normed latent) and k_pe [..., R] (shared rope key)."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.mla.kv_lora_rank, self.mla.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rotary(k_pe, cos, sin, self.interleaved)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [Hq, P, L] and W_UV [Hq, V, L], views of kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.mla.qk_nope_head_dim + self.mla.v_head_dim, -1)
        return w[:, : self.mla.qk_nope_head_dim], w[:, self.mla.qk_nope_head_dim :]

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, S, H], positions: [S]
        cos, sin = self.rotary(positions)
        q_nope, q_pe = self.project_q(x, cos, sin)  # [B, S, Hq, P], [B, S, Hq, R]
        c_kv, k_pe = self.project_latent(x, cos, sin)  # [B, S, L], [B, S, R]
        kv = self.kv_b_proj(c_kv).unflatten(-1, (self.num_heads, -1))  # [B, S, Hq, P + V]
        k_nope, v = kv.split([self.mla.qk_nope_head_dim, self.mla.v_head_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(-2).expand_as(q_pe)), dim=-1)
        out = dense_attention(q, k, v, causal_mask(positions, positions), self.scale)  # [B, S, Hq, V]
        return self.o_proj(out.flatten(-2))

    def forward_absorbed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary(positions)
        q_nope, q_pe = self.project_q(x, cos, sin)
        c_kv, k_pe = self.project_latent(x, cos, sin)
        w_uk, w_uv = self.absorbed_weights()
        q_latent = torch.einsum("bshp,hpl->bshl", q_nope, w_uk)  # [B, S, Hq, L]
        q = torch.cat((q_latent, q_pe), dim=-1)  # [B, S, Hq, L + R]
        k = torch.cat((c_kv, k_pe), dim=-1).unsqueeze(2)  # [B, S, 1, L + R]: one KV head
        out_latent = dense_attention(q, k, c_kv.unsqueeze(2), causal_mask(positions, positions), self.scale)
        out = torch.einsum("bshl,hvl->bshv", out_latent, w_uv)  # [B, S, Hq, V]
        return self.o_proj(out.flatten(-2))
