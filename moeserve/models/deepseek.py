"""DeepSeek-V2, V2-Lite and V3 (and configs that reuse V3, such as Kimi-K2): MLA attention, DeepSeek MoE."""

import re

from moeserve.config import (AttentionConfig, ConfigFields, MLAConfig, ModelConfig, MoEConfig, check_silu,
                             common_fields, parse_rope)
from moeserve.layers.attention.mla import MLAttention
from moeserve.layers.mlp import MLP
from moeserve.layers.moe.moe import MoE
from moeserve.models.base import CausalLM, DecoderLayer

_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


class DeepseekForCausalLM(CausalLM):
    def build_layer(self, layer: int) -> DecoderLayer:
        c = self.config
        attn = MLAttention(c.hidden_size, c.num_heads, c.mla, c.rope, c.attention.qkv_bias, layer)
        mlp = MoE(c.hidden_size, c.moe) if c.is_moe_layer(layer) else MLP(c.hidden_size, c.intermediate_size)
        return DecoderLayer(attn, mlp, c.hidden_size, c.rms_norm_eps)

    def is_ignored_checkpoint_key(self, name: str) -> bool:
        match = _LAYER_INDEX.match(name)
        is_mtp_layer = match is not None and int(match.group(1)) >= self.config.num_layers
        return is_mtp_layer or super().is_ignored_checkpoint_key(name)

    @classmethod
    def parse_config(cls, f: ConfigFields) -> ModelConfig:
        check_silu(f)
        common = common_fields(f)
        mla = MLAConfig(
            q_lora_rank=f.get("q_lora_rank"),
            kv_lora_rank=int(f.require("kv_lora_rank")),
            qk_nope_head_dim=int(f.require("qk_nope_head_dim")),
            qk_rope_head_dim=int(f.require("qk_rope_head_dim")),
            v_head_dim=int(f.require("v_head_dim")),
        )
        interleaved = common["architecture"] != "DeepseekV3ForCausalLM" or bool(f.get("rope_interleave", True))
        rope = parse_rope(f, mla.qk_rope_head_dim, interleaved, default_theta=10000.0)
        first_dense = int(f.get("first_k_dense_replace", 0))
        freq = int(f.get("moe_layer_freq", 1))
        moe_layers = tuple(i for i in range(common["num_layers"]) if i >= first_dense and i % freq == 0)
        return ModelConfig(
            **common,
            num_kv_heads=common["num_heads"],
            head_dim=mla.qk_head_dim,
            intermediate_size=int(f.require("intermediate_size")),
            rope=rope,
            moe=parse_deepseek_moe(f),
            moe_layers=moe_layers,
            mla=mla,
            attention=AttentionConfig(qkv_bias=bool(f.get("attention_bias", False))),
        )


def parse_deepseek_moe(f: ConfigFields) -> MoEConfig:
    is_v3 = f.raw["architectures"][0] == "DeepseekV3ForCausalLM"
    num_experts = int(f.require("n_routed_experts"))
    top_k = int(f.require("num_experts_per_tok"))
    # defaults are transformers' config defaults
    num_groups = int(f.get("n_group", 8 if is_v3 else 1))
    topk_groups = int(f.get("topk_group", 4 if is_v3 else 1))
    if is_v3:  # transformers' V3 hard-codes sigmoid + noaux_tc whatever scoring_func / topk_method say
        scoring, group_score = "sigmoid", "top2_sum"
    else:
        scoring = f.get("scoring_func", "softmax")
        method = f.get("topk_method", "greedy")
        if scoring != "softmax" or method not in ("greedy", "group_limited_greedy"):
            raise f.error(f"DeepSeek-V2 routing scoring_func={scoring!r} topk_method={method!r} is not supported "
                          "(supported: softmax with greedy or group_limited_greedy)")
        group_score = "max" if method == "group_limited_greedy" else None
    if num_groups <= 1:
        group_score = None
    if group_score is not None:
        if num_experts % num_groups:
            raise f.error(f"n_routed_experts={num_experts} is not divisible by n_group={num_groups}")
        eligible = topk_groups * num_experts // num_groups
        if top_k > eligible:
            raise f.error(f"num_experts_per_tok={top_k} exceeds the {eligible} experts of topk_group={topk_groups} "
                          f"groups; lower num_experts_per_tok or raise topk_group")
    return MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        intermediate_size=int(f.require("moe_intermediate_size")),
        scoring=scoring,
        renormalize=bool(f.get("norm_topk_prob", is_v3)),
        scaling_factor=float(f.get("routed_scaling_factor", 2.5 if is_v3 else 1.0)),
        num_groups=num_groups,
        topk_groups=topk_groups,
        group_score=group_score,
        correction_bias=is_v3,
        logits_fp32=True,
        shared_intermediate_size=int(f.get("n_shared_experts", 0)) * int(f.require("moe_intermediate_size")),
    )
