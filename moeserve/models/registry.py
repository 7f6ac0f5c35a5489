"""architectures[0] of a config.json -> the model class that implements it, and the config it parses.

The registry sits above the models and the config: the config module knows no model family."""

from typing import Any

from moeserve.config import ConfigError, ConfigFields, ModelConfig
from moeserve.models.base import CausalLM
from moeserve.models.deepseek import DeepseekForCausalLM
from moeserve.models.llama4 import Llama4ForCausalLM
from moeserve.models.mixtral import MixtralForCausalLM
from moeserve.models.qwen_moe import QwenMoeForCausalLM

ARCHITECTURES: dict[str, type[CausalLM]] = {
    "DeepseekV3ForCausalLM": DeepseekForCausalLM,  # also Kimi-K2, which reuses it
    "DeepseekV2ForCausalLM": DeepseekForCausalLM,
    "Qwen3MoeForCausalLM": QwenMoeForCausalLM,
    "Qwen2MoeForCausalLM": QwenMoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Llama4ForCausalLM": Llama4ForCausalLM,
    "Llama4ForConditionalGeneration": Llama4ForCausalLM,  # its text model
}


def model_class(architecture: str, source: str) -> type[CausalLM]:
    if architecture not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"{source}: architecture '{architecture}' is not supported (supported: {supported})")
    return ARCHITECTURES[architecture]


def parse_config(raw: dict[str, Any], source: str) -> ModelConfig:
    """A raw config.json -> ModelConfig, parsed by the family that `architectures[0]` names."""
    fields = ConfigFields(raw, source)
    architectures = fields.require("architectures")
    if not isinstance(architectures, list) or not architectures:
        raise fields.error("field 'architectures' must be a non-empty list")
    return model_class(architectures[0], source).parse_config(fields)
