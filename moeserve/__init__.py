"""moeserve: serving Mixture-of-Experts language models."""

from moeserve.config import ConfigError, ModelConfig
from moeserve.loader.checkpoint import CheckpointError
from moeserve.loader.model_loader import build_model, load_config, load_model
from moeserve.loader.tokenizer import load_tokenizer

__all__ = ["CheckpointError", "ConfigError", "ModelConfig", "build_model", "load_config", "load_model", "load_tokenizer"]
