"""Grouped-query attention: Mixtral, Qwen2-MoE (q/k/v bias), Qwen3-MoE (per-head q/k RMSNorm), Llama 4
(chunked attention on RoPE layers, NoPE layers with temperature tuning, L2 q/k norm)."""

import torch
from torch import nn

from moeserve.config import AttentionConfig, RopeConfig
from moeserve.layers.linear import fuse_linear_weights, linear
from moeserve.layers.norm import RMSNorm, rms_normalize
from moeserve.layers.rotary import RotaryEmbedding
from moeserve.ops.rotary import rotate_query_key


class GQAttention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rope: RopeConfig | None,  # None: a NoPE layer
        options: AttentionConfig,
        norm_eps: float,
        layer_idx: int,
        chunk_size: int | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=options.qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=options.qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=options.qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=options.o_bias)
        if options.qk_norm == "rms":
            self.q_norm = RMSNorm(head_dim, norm_eps)
            self.k_norm = RMSNorm(head_dim, norm_eps)
        self.rotary = RotaryEmbedding(rope) if rope is not None else None
        self.interleaved = rope is not None and rope.interleaved
        self.l2_qk_norm = options.qk_norm == "l2" and rope is not None
        self.norm_eps = norm_eps
        self.temperature_tuning = options.temperature_tuning and rope is None
        self.attn_scale, self.floor_scale = options.attn_scale, options.floor_scale
        self.sliding_window = options.sliding_window
        self.chunk_size = chunk_size
        self.scale = head_dim**-0.5
        self.fused_qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def fuse_projections(self) -> None:
        """q_proj, k_proj and v_proj read the same x: one GEMM for all three."""
        self.fused_qkv = fuse_linear_weights(self.q_proj, self.k_proj, self.v_proj)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fused_qkv is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        weight, bias = self.fused_qkv
        sizes = [proj.out_features for proj in (self.q_proj, self.k_proj, self.v_proj)]
        return linear(x, weight, bias).split(sizes, dim=-1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        # x: [T, H], positions: [T], attn: the AttentionBackend
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in self.qkv(x))  # [T, Hq | Hk | Hk, D]
        q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
        if self.rotary is not None:
            q, k = rotate_query_key(q, k, positions, self.rotary, self.interleaved, q_norm, k_norm)
        elif q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        if self.l2_qk_norm:
            q, k = rms_normalize(q, self.norm_eps), rms_normalize(k, self.norm_eps)
        if self.temperature_tuning:
            q = (q * self.temperature(positions)[:, None, None]).to(q.dtype)
        out = attn.gqa(self.layer_idx, q, k, v, self.scale, self.sliding_window, self.chunk_size)  # [T, Hq, D]
        return self.o_proj(out.flatten(-2))

    def temperature(self, positions: torch.Tensor) -> torch.Tensor:
        """Llama 4 NoPE layers sharpen attention at long positions: 1 + s * log1p(floor((p + 1) / f))."""
        return torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
