"""Llama 4 (text): GQA with chunked attention on RoPE layers, NoPE layers with temperature tuning,
L2 q/k norm, top-1 sigmoid routing applied to the expert input, an always-on shared expert."""

from moeserve.config import (AttentionConfig, ConfigFields, ModelConfig, MoEConfig, check_silu, common_fields,
                             gqa_head_fields, parse_rope)
from moeserve.layers.attention.gqa import GQAttention
from moeserve.layers.mlp import MLP
from moeserve.layers.moe.moe import MoE
from moeserve.models.base import CausalLM, DecoderLayer


class Llama4ForCausalLM(CausalLM):
    checkpoint_renames = (
        (r"^language_model\.", ""),  # Llama4ForConditionalGeneration checkpoints
        (r"\.feed_forward\.router\.", ".mlp.gate."),
        (r"\.feed_forward\.shared_expert\.", ".mlp.shared_experts."),
        (r"\.feed_forward\.", ".mlp."),
    )
    export_renames = (
        (r"\.mlp\.gate\.", ".feed_forward.router."),
        (r"\.mlp\.shared_experts\.", ".feed_forward.shared_expert."),
        (r"\.mlp\.", ".feed_forward."),
    )
    fused_experts_transposed = True

    def build_layer(self, layer: int) -> DecoderLayer:
        c = self.config
        a = c.attention
        rope = None if layer in a.nope_layers else c.rope
        chunk = a.chunk_size if layer in a.chunked_layers else None
        attn = GQAttention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, rope, a, c.rms_norm_eps, layer, chunk)
        mlp = MoE(c.hidden_size, c.moe) if c.is_moe_layer(layer) else MLP(c.hidden_size, c.intermediate_size)
        return DecoderLayer(attn, mlp, c.hidden_size, c.rms_norm_eps)

    def is_ignored_checkpoint_key(self, name: str) -> bool:
        multimodal = name.startswith(("vision_model.", "multi_modal_projector."))
        return multimodal or super().is_ignored_checkpoint_key(name)

    @classmethod
    def parse_config(cls, f: ConfigFields) -> ModelConfig:
        if f.raw["architectures"][0] == "Llama4ForConditionalGeneration":  # serve its text model
            text = f.require("text_config")
            f = ConfigFields({**text, "architectures": f.raw["architectures"]}, f.source + " (text_config)")
        check_silu(f)
        common = common_fields(f)
        common["rms_norm_eps"] = float(f.get("rms_norm_eps", 1e-5))
        heads = gqa_head_fields(f, common["num_heads"], common["hidden_size"])
        num_layers = common["num_layers"]
        interval = int(f.get("no_rope_layer_interval", 4))
        uses_rope = f.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
        step = int(f.get("interleave_moe_layer_step", 1))
        moe_layers = f.get("moe_layers", list(range(step - 1, num_layers, step)))
        chunk_size = f.get("attention_chunk_size")
        layer_types = f.get("layer_types") or [
            "chunked_attention" if rope and chunk_size is not None else "full_attention" for rope in uses_rope
        ]
        top_k = int(f.get("num_experts_per_tok", 1))
        if top_k != 1:
            raise f.error(f"num_experts_per_tok={top_k}: Llama 4 routing scales the expert input, which moeserve "
                          "supports for top-1 only")
        intermediate = int(f.require("intermediate_size"))
        moe = MoEConfig(
            num_experts=int(f.require("num_local_experts")),
            top_k=1,
            intermediate_size=intermediate,
            scoring="sigmoid",
            renormalize=False,
            weights_on_input=True,
            shared_intermediate_size=intermediate,
        )
        attention = AttentionConfig(
            qkv_bias=bool(f.get("attention_bias", False)),
            o_bias=bool(f.get("attention_bias", False)),
            qk_norm="l2" if f.get("use_qk_norm", True) else None,
            chunk_size=chunk_size,
            chunked_layers=tuple(i for i, t in enumerate(layer_types) if t == "chunked_attention"),
            nope_layers=tuple(i for i, rope in enumerate(uses_rope) if not rope),
            temperature_tuning=bool(f.get("attn_temperature_tuning", True)),
            attn_scale=float(f.get("attn_scale", 0.1)),
            floor_scale=float(f.get("floor_scale", 8192)),
        )
        return ModelConfig(
            **common,
            **heads,
            intermediate_size=int(f.get("intermediate_size_mlp", intermediate)),
            rope=parse_rope(f, heads["head_dim"], interleaved=True, default_theta=500000.0),
            moe=moe,
            moe_layers=tuple(moe_layers),
            attention=attention,
        )
