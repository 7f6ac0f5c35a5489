"""Built-in models.

Tiny presets: small configs of every family whose routers really group and choose, with
deterministic random weights and a byte-level BPE tokenizer, written as a Hugging Face checkpoint
folder to the cache on first use. Shape presets: the real configs (no weights), for memory planning
and benchmarks with random weights.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from moeserve.loader.build import build_model
from moeserve.loader.random_init import random_init
from moeserve.loader.tiny_tokenizer import write_tiny_tokenizer
from moeserve.loader.weights import export_state_dict
from moeserve.models.registry import parse_config

PRESET_FORMAT = 3  # bump when generation changes, so cached folders are rebuilt

_SPECIAL = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
_TINY_VOCAB = 512

TINY_PRESETS: dict[str, dict] = {
    "tiny-deepseek-v3": dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=_TINY_VOCAB, hidden_size=128,
        intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=64, kv_lora_rank=32,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, first_k_dense_replace=1,
        max_position_embeddings=4096, rms_norm_eps=1e-6, rope_interleave=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=1024,
                             beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        **_SPECIAL),
    "tiny-deepseek-v2-lite": dict(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=_TINY_VOCAB, hidden_size=128,
        intermediate_size=256, moe_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4, n_group=1,
        topk_group=1, topk_method="greedy", scoring_func="softmax", routed_scaling_factor=1.0, norm_topk_prob=False,
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        first_k_dense_replace=1, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=1024,
                             beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
        **_SPECIAL),
    "tiny-qwen3-moe": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=_TINY_VOCAB, hidden_size=128,
        intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[0], max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), **_SPECIAL),
    "tiny-qwen2-moe": dict(
        architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", vocab_size=_TINY_VOCAB, hidden_size=128,
        intermediate_size=256, moe_intermediate_size=64, shared_expert_intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_experts=12, num_experts_per_tok=4, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[1], qkv_bias=True, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), **_SPECIAL),
    "tiny-mixtral": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=_TINY_VOCAB, hidden_size=128,
        intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
        sliding_window=None, rope_parameters=dict(rope_type="default", rope_theta=1000000.0), **_SPECIAL),
    "tiny-llama4": dict(
        architectures=["Llama4ForCausalLM"], model_type="llama4_text", vocab_size=_TINY_VOCAB, hidden_size=128,
        intermediate_size=64, intermediate_size_mlp=192, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=2,
        no_rope_layer_interval=4, attention_chunk_size=64, use_qk_norm=True, attn_temperature_tuning=True,
        floor_scale=32, attn_scale=0.1, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=256),
        **_SPECIAL),
}

SHAPE_PRESETS: dict[str, dict] = {
    "deepseek-v3": dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8,
        topk_group=4, num_experts_per_tok=8, moe_layer_freq=1, first_k_dense_replace=3, norm_topk_prob=True,
        scoring_func="sigmoid", max_position_embeddings=163840, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        rope_theta=10000, rope_scaling=dict(type="yarn", factor=40, beta_fast=32, beta_slow=1, mscale=1.0,
                                            mscale_all_dim=1.0, original_max_position_embeddings=4096),
        torch_dtype="bfloat16"),
    "deepseek-v2-lite": dict(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
        num_experts_per_tok=6, first_k_dense_replace=1, norm_topk_prob=False, scoring_func="softmax",
        max_position_embeddings=163840, rms_norm_eps=1e-6, bos_token_id=100000, eos_token_id=100001,
        rope_theta=10000, rope_scaling=dict(type="yarn", factor=40, beta_fast=32, beta_slow=1, mscale=0.707,
                                            mscale_all_dim=0.707, original_max_position_embeddings=4096),
        torch_dtype="bfloat16"),
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16"),
    "mixtral-8x7b": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
        sliding_window=None, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16"),
    "llama-4-scout": dict(
        architectures=["Llama4ForCausalLM"], model_type="llama4_text", vocab_size=202048, hidden_size=5120, intermediate_size=8192,
        intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
        head_dim=128, num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
        no_rope_layer_interval=4, attention_chunk_size=8192, use_qk_norm=True, attn_temperature_tuning=True,
        floor_scale=8192, attn_scale=0.1, max_position_embeddings=10485760, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0,
                                               high_freq_factor=1.0, original_max_position_embeddings=8192),
        bos_token_id=200000, eos_token_id=[200001, 200007, 200008], pad_token_id=200018, torch_dtype="bfloat16"),
}


def all_names() -> list[str]:
    return sorted(TINY_PRESETS) + sorted(SHAPE_PRESETS)


def cache_root() -> Path:
    return Path(os.environ.get("MOESERVE_CACHE_DIR", Path.home() / ".cache" / "moeserve"))


def materialize(name: str) -> Path:
    """The preset's checkpoint folder, generated on first use (atomically: concurrent ranks are safe)."""
    config = {**TINY_PRESETS[name], "dtype": "float32"}
    key = hashlib.sha256(json.dumps([PRESET_FORMAT, config], sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / "presets" / f"{name}-{key}"
    if (folder / "model.safetensors").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        write_preset(name, config, staging)
        os.rename(staging, folder)
    except OSError:
        if not (folder / "model.safetensors").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def write_preset(name: str, config: dict, folder: Path) -> None:
    model = build_model(parse_config(config, f"preset {name}"))
    random_init(model, seed=int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    save_file(dict(export_state_dict(model)), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tiny_tokenizer(folder, config["vocab_size"])
