"""Mixtral: GQA attention (optional sliding window), softmax top-2 over 8 experts, no shared expert."""

from moeserve.config import (AttentionConfig, ConfigFields, ModelConfig, MoEConfig, check_silu, common_fields,
                             gqa_head_fields, parse_rope)
from moeserve.layers.attention.gqa import GQAttention
from moeserve.layers.moe.moe import MoE
from moeserve.models.base import CausalLM, DecoderLayer


class MixtralForCausalLM(CausalLM):
    checkpoint_renames = (
        (r"\.block_sparse_moe\.", ".mlp."),
        (r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_proj."),
        (r"\.experts\.(\d+)\.w3\.", r".experts.\1.up_proj."),
        (r"\.experts\.(\d+)\.w2\.", r".experts.\1.down_proj."),
    )
    export_renames = (
        (r"\.mlp\.", ".block_sparse_moe."),
        (r"\.experts\.(\d+)\.gate_proj\.", r".experts.\1.w1."),
        (r"\.experts\.(\d+)\.up_proj\.", r".experts.\1.w3."),
        (r"\.experts\.(\d+)\.down_proj\.", r".experts.\1.w2."),
    )

    def build_layer(self, layer: int) -> DecoderLayer:
        c = self.config
        attn = GQAttention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.rope, c.attention, c.rms_norm_eps,
                           layer)
        return DecoderLayer(attn, MoE(c.hidden_size, c.moe), c.hidden_size, c.rms_norm_eps)

    @classmethod
    def parse_config(cls, f: ConfigFields) -> ModelConfig:
        check_silu(f)
        common = common_fields(f)
        heads = gqa_head_fields(f, common["num_heads"], common["hidden_size"])
        intermediate = int(f.require("intermediate_size"))
        moe = MoEConfig(
            num_experts=int(f.require("num_local_experts")),
            top_k=int(f.require("num_experts_per_tok")),
            intermediate_size=intermediate,
            scoring="softmax",
            renormalize=True,
        )
        return ModelConfig(
            **common,
            **heads,
            intermediate_size=intermediate,
            rope=parse_rope(f, heads["head_dim"], interleaved=False, default_theta=1e6),
            moe=moe,
            moe_layers=tuple(range(common["num_layers"])),
            attention=AttentionConfig(sliding_window=f.get("sliding_window")),
        )
