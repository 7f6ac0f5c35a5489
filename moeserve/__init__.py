"""moeserve: serving Mixture-of-Experts language models."""

from moeserve.config import ConfigError, ModelConfig
from moeserve.engine.args import EngineArgs
from moeserve.engine.async_engine import AsyncEngine
from moeserve.engine.outputs import CompletionOutput, RequestOutput
from moeserve.llm import LLM
from moeserve.loader.checkpoint import CheckpointError
from moeserve.loader.build import build_model
from moeserve.loader.model_loader import load_config, load_model
from moeserve.loader.tokenizer import load_tokenizer
from moeserve.sampling_params import RequestError, SamplingParams, SamplingParamsError

__all__ = [
    "LLM", "AsyncEngine", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput",
    "load_model", "load_config", "build_model", "load_tokenizer", "ModelConfig",
    "ConfigError", "CheckpointError", "RequestError", "SamplingParamsError",
]
