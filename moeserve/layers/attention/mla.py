"""Multi-head latent attention (DeepSeek-V2/V3), in the plain per-head form and the absorbed form.

Plain: up-project the latent to per-head keys and values, then ordinary attention (prefill, and what
Hugging Face computes). Absorbed: fold W_UK into the query and W_UV into the output, so attention runs
as MQA over the latent itself, [c_kv | k_pe], which is all the KV cache has to hold (decode).
"""

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.config import MLAConfig, RopeConfig
from moeserve.layers.attention.dense import attention_with_lse
from moeserve.layers.linear import fuse_linear_weights, linear
from moeserve.layers.norm import RMSNorm
from moeserve.layers.rotary import RotaryEmbedding, yarn_mscale
from moeserve.ops.rotary import rotate_query_key
from moeserve.quant.formats import weight_matrix

LATENT_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm ignore rms_norm_eps in the reference


def mla_softmax_scale(mla: MLAConfig, rope: RopeConfig) -> float:
    """qk_head_dim^-0.5, times mscale^2 for YaRN checkpoints that set mscale_all_dim."""
    scale = mla.qk_head_dim**-0.5
    if rope.kind != "default" and rope.mscale_all_dim:
        scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


class MLAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mla: MLAConfig, rope: RopeConfig, bias: bool, layer_idx: int):
        super().__init__()
        self.mla = mla
        self.num_heads = num_heads
        self.layer_idx = layer_idx
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
        self.fused_input_proj: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def fuse_projections(self) -> None:
        """q_proj (or q_a_proj) and kv_a_proj_with_mqa read the same x: one GEMM for both."""
        first = self.q_proj if self.mla.q_lora_rank is None else self.q_a_proj
        self.fused_input_proj = fuse_linear_weights(first, self.kv_a_proj_with_mqa)

    def input_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (q_proj(x) or q_a_proj(x), kv_a_proj_with_mqa(x))."""
        if self.fused_input_proj is not None:
            weight, bias = self.fused_input_proj
            return linear(x, weight, bias).split([weight.shape[0] - self.mla.latent_dim, self.mla.latent_dim], dim=-1)
        first = self.q_proj if self.mla.q_lora_rank is None else self.q_a_proj
        return first(x), self.kv_a_proj_with_mqa(x)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        # x: [T, H], positions: [T]
        q, kv_a = self.input_projections(x)
        if self.mla.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q_nope, q_pe = q.unflatten(-1, (self.num_heads, -1)).split(
            [self.mla.qk_nope_head_dim, self.mla.qk_rope_head_dim], dim=-1)  # [T, Hq, P], [T, Hq, R]
        c_kv, k_pe = kv_a.split([self.mla.kv_lora_rank, self.mla.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [T, L]: with k_pe [T, R], all the cache holds
        q_pe, k_pe = rotate_query_key(q_pe, k_pe, positions, self.rotary, self.interleaved)
        out = attn.mla(self.layer_idx, q_nope, q_pe, c_kv, k_pe, self)  # [T, Hq, V]
        return self.o_proj(out.flatten(-2))

    def decompress(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [..., N, L] and rope keys [..., N, R] -> keys [..., N, Hq, P + R], values [..., N, Hq, V].
        kv_b_proj's weight as the absorbed path multiplies it (a quantized one dequantized, the latents not
        quantized: W8A16, as DeepSeek's absorb mode), so that prefill and decode compute the same attention."""
        weight = self.kv_b_weight(c_kv.dtype).flatten(0, 1)  # [Hq (P + V), L]
        kv = F.linear(c_kv, weight).unflatten(-1, (self.num_heads, -1))  # [..., N, Hq, P + V]
        k_nope, v = kv.split([self.mla.qk_nope_head_dim, self.mla.v_head_dim], dim=-1)
        k_rope = k_pe.unsqueeze(-2).expand(*k_pe.shape[:-1], self.num_heads, k_pe.shape[-1])
        return torch.cat((k_nope, k_rope), dim=-1), v

    def kv_b_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """kv_b_proj's weight as [Hq, P + V, L] in dtype: a view of it, or of its dequantized copy, made once
        (`prepare_absorbed`) when kv_b_proj is quantized or in another dtype."""
        prepared = getattr(self, "kv_b_prepared", None)
        if prepared is not None and prepared.dtype == dtype:
            return prepared
        w = weight_matrix(self.kv_b_proj.weight, (), dtype)
        return w.view(self.num_heads, self.mla.qk_nope_head_dim + self.mla.v_head_dim, -1)

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [Hq, P, L] and W_UV [Hq, V, L]: views of `kv_b_weight`."""
        w = self.kv_b_weight(dtype)
        return w[:, : self.mla.qk_nope_head_dim], w[:, self.mla.qk_nope_head_dim :]

    def prepare_absorbed(self, dtype: torch.dtype) -> None:
        """Compute kv_b_proj's weight in dtype once (after the weights are loaded), never per layer per step."""
        self.kv_b_prepared = None
        self.kv_b_prepared = self.kv_b_weight(dtype)


def prepare_absorbed_weights(model: nn.Module, dtype: torch.dtype) -> None:
    for module in model.modules():
        if isinstance(module, MLAttention):
            module.prepare_absorbed(dtype)


def mla_plain(attention: MLAttention, q_nope, q_pe, c_kv, k_pe, allowed):
    """q [..., Sq, Hq, P|R] over latent keys c_kv [..., Sk, L], k_pe [..., Sk, R] -> (out [..., Sq, Hq, V], lse)."""
    k, v = attention.decompress(c_kv, k_pe)
    return attention_with_lse(torch.cat((q_nope, q_pe), dim=-1), k, v, allowed, attention.scale)


def mla_absorbed(attention: MLAttention, q_nope, q_pe, c_kv, k_pe, allowed):
    """The same attention as `mla_plain`, computed as MQA over the latent."""
    return mla_absorbed_latent(attention, q_nope, q_pe, torch.cat((c_kv, k_pe), dim=-1), allowed)


def mla_absorbed_latent(attention: MLAttention, q_nope, q_pe, latent, allowed):
    """`mla_absorbed` over latent = [c_kv | k_pe] [..., Sk, L + R] as the paged cache stores it (no copy)."""
    w_uk, w_uv = attention.absorbed_weights(q_nope.dtype)
    q_latent = torch.einsum("...qhp,hpl->...qhl", q_nope, w_uk)  # [..., Sq, Hq, L]
    q = torch.cat((q_latent, q_pe), dim=-1)  # [..., Sq, Hq, L + R]
    keys = latent.unsqueeze(-2)  # [..., Sk, 1, L + R]: one KV head
    values = keys[..., : q_latent.shape[-1]]  # c_kv
    out_latent, lse = attention_with_lse(q, keys, values, allowed, attention.scale)
    return torch.einsum("...qhl,hvl->...qhv", out_latent, w_uv), lse
