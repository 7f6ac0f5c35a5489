"""Model configuration: one typed `ModelConfig` parsed from a Hugging Face `config.json`.

The family-specific parsing lives beside each model (models/*.py), the dispatch on `architectures`
in models/registry.py (this module knows no model family); this module holds the
dataclasses, the field reader that turns a missing field into a clear error, and RoPE parsing,
which every family shares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A config.json that moeserve cannot use; the message names the file and the field."""


@dataclass(frozen=True)
class RopeConfig:
    kind: Literal["default", "llama3", "yarn"]
    theta: float
    dim: int  # rotary dims per head
    interleaved: bool  # pairs (x0,x1),(x2,x3).. rotate together (DeepSeek, Llama 4); else halves (Llama, Qwen)
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class MLAConfig:
    q_lora_rank: int | None  # None: a plain q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer: the normed latent and the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    intermediate_size: int
    scoring: Literal["softmax", "sigmoid"]
    renormalize: bool
    scaling_factor: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1
    group_score: Literal["max", "top2_sum"] | None = None  # None: no group limit
    correction_bias: bool = False  # DeepSeek-V3 e_score_correction_bias (selection only)
    logits_fp32: bool = False  # router matmul in fp32 (DeepSeek)
    weights_on_input: bool = False  # Llama 4 scales the expert input, not its output
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(H, 1)) on the shared expert


@dataclass(frozen=True)
class AttentionConfig:
    """Options of GQA attention that vary by family (MLA models use `ModelConfig.mla`)."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: Literal["rms", "l2"] | None = None  # Qwen3: per-head RMSNorm before RoPE; Llama 4: L2 after
    sliding_window: int | None = None
    chunk_size: int | None = None  # Llama 4: chunked attention on `chunked_layers`
    chunked_layers: tuple[int, ...] = ()
    nope_layers: tuple[int, ...] = ()  # Llama 4: layers without RoPE
    temperature_tuning: bool = False  # Llama 4 NoPE layers: q *= 1 + attn_scale*log1p(floor((pos+1)/floor_scale))
    attn_scale: float = 0.1
    floor_scale: float = 8192.0


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # GQA head dim; for MLA the q/k head dim (nope + rope)
    intermediate_size: int  # dense MLP width
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    moe: MoEConfig
    moe_layers: tuple[int, ...]
    tie_word_embeddings: bool = False
    mla: MLAConfig | None = None
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    dtype: str = "bfloat16"  # the checkpoint's dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers


class ConfigFields:
    """Reads a raw config dict; a missing required field is an error naming the field and the file."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw = raw
        self.source = source

    def require(self, name: str, *aliases: str) -> Any:
        """The field's value; transformers writes some fields under other names (`aliases`)."""
        for key in (name, *aliases):
            if self.raw.get(key) is not None:
                return self.raw[key]
        arch = self.raw.get("architectures", ["?"])[0]
        raise ConfigError(f"{self.source}: field '{name}' is missing; {arch} needs it")

    def get(self, name: str, default: Any = None) -> Any:
        value = self.raw.get(name)
        return default if value is None else value

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")


def parse_rope(fields: ConfigFields, dim: int, interleaved: bool, default_theta: float) -> RopeConfig:
    """RoPE from `rope_parameters` (transformers v5) or `rope_scaling` + `rope_theta` (v4 and originals)."""
    params = dict(fields.get("rope_parameters") or fields.get("rope_scaling") or {})
    theta = float(params.get("rope_theta") or fields.get("rope_theta", default_theta))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "llama3", "yarn"):
        raise fields.error(f"rope type '{kind}' is not supported (supported: default, llama3, yarn)")
    if kind == "default":
        return RopeConfig("default", theta, dim, interleaved)
    original = params.get("original_max_position_embeddings") or fields.get("max_position_embeddings")
    factor = params.get("factor")
    if factor is None and kind == "yarn":
        factor = fields.require("max_position_embeddings") / original
    if factor is None:
        raise fields.error(f"rope type '{kind}' needs 'factor' in rope_parameters")
    common = dict(kind=kind, theta=theta, dim=dim, interleaved=interleaved, factor=float(factor),
                  original_max_position_embeddings=int(original))
    if kind == "llama3":
        return RopeConfig(**common, low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                          high_freq_factor=float(params.get("high_freq_factor", 4.0)))
    return RopeConfig(
        **common,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def common_fields(fields: ConfigFields) -> dict[str, Any]:
    """The fields every family reads the same way."""
    eos = fields.get("eos_token_id")
    return dict(
        architecture=fields.require("architectures")[0],
        vocab_size=int(fields.require("vocab_size")),
        hidden_size=int(fields.require("hidden_size")),
        num_layers=int(fields.require("num_hidden_layers")),
        num_heads=int(fields.require("num_attention_heads")),
        rms_norm_eps=float(fields.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(fields.require("max_position_embeddings")),
        tie_word_embeddings=bool(fields.get("tie_word_embeddings", False)),
        dtype=str(fields.get("dtype") or fields.get("torch_dtype") or "bfloat16"),
        bos_token_id=fields.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
        pad_token_id=fields.get("pad_token_id"),
    )


def check_silu(fields: ConfigFields) -> None:
    act = fields.get("hidden_act", "silu")
    if act != "silu":
        raise fields.error(f"hidden_act '{act}' is not supported (moeserve models use silu)")


def read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json; pass a Hugging Face checkpoint folder or a preset name")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def gqa_head_fields(fields: ConfigFields, num_heads: int, hidden_size: int) -> dict[str, int]:
    return dict(
        num_kv_heads=int(fields.get("num_key_value_heads", num_heads)),
        head_dim=int(fields.get("head_dim", hidden_size // num_heads)),
    )


def reject_sliding_window(fields: ConfigFields) -> None:
    if fields.get("use_sliding_window", False):
        raise fields.error("use_sliding_window=true is not supported for this family; set it to false")
