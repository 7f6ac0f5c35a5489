"""Tiny random Hugging Face reference models, one or more per family, configured so routing matters."""

import torch
import transformers

DS_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256)
GQA_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256)

CASES = {
    "deepseek-v3-yarn": ("DeepseekV3", dict(
        DS_COMMON, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=32, first_k_dense_replace=1,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                             beta_fast=32, beta_slow=1, mscale=0.9, mscale_all_dim=0.8))),
    "deepseek-v3-no-q-lora": ("DeepseekV3", dict(
        DS_COMMON, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, n_group=1, topk_group=1,
        routed_scaling_factor=1.5, norm_topk_prob=True, q_lora_rank=None, first_k_dense_replace=2,
        rope_interleave=False, rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "deepseek-v2": ("DeepseekV2", dict(
        DS_COMMON, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", routed_scaling_factor=2.0, q_lora_rank=32, first_k_dense_replace=1,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "deepseek-v2-lite": ("DeepseekV2", dict(
        DS_COMMON, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=6, topk_method="greedy",
        routed_scaling_factor=1.0, q_lora_rank=None, first_k_dense_replace=1,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32,
                             beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707))),
    "qwen2-moe": ("Qwen2Moe", dict(
        GQA_COMMON, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=12, num_experts_per_tok=4, norm_topk_prob=False, mlp_only_layers=[1], qkv_bias=True)),
    "qwen3-moe": ("Qwen3Moe", dict(
        GQA_COMMON, head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_experts=16,
        num_experts_per_tok=4, norm_topk_prob=True, mlp_only_layers=[0])),
    "mixtral": ("Mixtral", dict(
        GQA_COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, sliding_window=7)),
    "llama4": ("Llama4", dict(
        GQA_COMMON, num_hidden_layers=4, head_dim=16, intermediate_size=32, intermediate_size_mlp=96,
        num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layer_interval=4,
        attention_chunk_size=8, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
}


def build_reference(case: str, seed: int = 0) -> transformers.PreTrainedModel:
    family, kwargs = CASES[case]
    config_class = getattr(transformers, f"{family}TextConfig" if family == "Llama4" else f"{family}Config")
    model_class = getattr(transformers, f"{family}ForCausalLM")
    config = config_class(**kwargs)
    config._attn_implementation = "eager"
    model = model_class(config).eval()
    if hasattr(model, "set_experts_implementation") and family != "Llama4":
        model.set_experts_implementation("eager")
    reinit(model, seed)
    return model


def reinit(model: torch.nn.Module, seed: int) -> None:
    """Unit-scale weights and wide router logits (transformers' std 0.02 init makes near-ties),
    a random DeepSeek-V3 correction bias (it is zero after init)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()) + sorted(model.named_buffers()):
            if not param.is_floating_point() or "inv_freq" in name:
                continue
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype)
            if name.endswith(("mlp.gate.weight", "feed_forward.router.weight")):
                param.copy_(noise * 2.0 / hidden**0.5)
            elif name.endswith("e_score_correction_bias"):
                param.copy_(noise * 0.1)
            elif name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif param.dim() == 1:
                param.copy_(0.1 * noise)
            elif name.endswith("embed_tokens.weight"):
                param.copy_(noise)
            else:
                fan_in = param.shape[1] if name.endswith("experts.gate_up_proj") and param.shape[1] == hidden else param.shape[-1]
                param.copy_(noise / fan_in**0.5)
