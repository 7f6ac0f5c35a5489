"""Qwen2-MoE (q/k/v bias, sigmoid-gated shared expert) and Qwen3-MoE (per-head q/k RMSNorm)."""

from moeserve.config import (AttentionConfig, ConfigFields, ModelConfig, MoEConfig, check_silu, common_fields,
                             gqa_head_fields, parse_rope, reject_sliding_window)
from moeserve.layers.attention.gqa import GQAttention
from moeserve.layers.mlp import MLP
from moeserve.layers.moe.moe import MoE
from moeserve.models.base import CausalLM, DecoderLayer


class QwenMoeForCausalLM(CausalLM):
    checkpoint_renames = ((r"\.mlp\.shared_expert\.", ".mlp.shared_experts."),)
    export_renames = ((r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),)

    def build_layer(self, layer: int) -> DecoderLayer:
        c = self.config
        attn = GQAttention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.rope, c.attention, c.rms_norm_eps,
                           layer)
        mlp = MoE(c.hidden_size, c.moe) if c.is_moe_layer(layer) else MLP(c.hidden_size, c.intermediate_size)
        return DecoderLayer(attn, mlp, c.hidden_size, c.rms_norm_eps)

    @classmethod
    def parse_config(cls, f: ConfigFields) -> ModelConfig:
        check_silu(f)
        reject_sliding_window(f)
        common = common_fields(f)
        heads = gqa_head_fields(f, common["num_heads"], common["hidden_size"])
        is_qwen2 = common["architecture"] == "Qwen2MoeForCausalLM"
        num_experts = int(f.require("num_experts", "num_local_experts"))
        dense_only = set(f.get("mlp_only_layers", []))
        step = int(f.get("decoder_sparse_step", 1))
        moe_layers = tuple(
            i for i in range(common["num_layers"]) if i not in dense_only and num_experts > 0 and (i + 1) % step == 0
        )
        if is_qwen2:
            attention = AttentionConfig(qkv_bias=bool(f.get("qkv_bias", True)))
            shared = int(f.require("shared_expert_intermediate_size"))
        else:
            bias = bool(f.get("attention_bias", False))
            attention = AttentionConfig(qkv_bias=bias, o_bias=bias, qk_norm="rms")
            shared = 0
        moe = MoEConfig(
            num_experts=num_experts,
            top_k=int(f.require("num_experts_per_tok")),
            intermediate_size=int(f.require("moe_intermediate_size")),
            scoring="softmax",
            renormalize=bool(f.get("norm_topk_prob", False)),
            shared_intermediate_size=shared,
            shared_expert_gate=is_qwen2,
        )
        return ModelConfig(
            **common,
            **heads,
            intermediate_size=int(f.require("intermediate_size")),
            rope=parse_rope(f, heads["head_dim"], interleaved=False, default_theta=10000.0),
            moe=moe,
            moe_layers=moe_layers,
            attention=attention,
        )
