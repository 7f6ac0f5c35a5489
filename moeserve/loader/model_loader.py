"""load_model / load_config: a checkpoint folder or a built-in preset -> a ready model."""

import logging
import time
from pathlib import Path

import torch

from moeserve.config import ConfigError, ModelConfig, read_config_json
from moeserve.distributed.parallelize import ParallelOptions
from moeserve.loader import presets
from moeserve.loader.build import build_model
from moeserve.loader.checkpoint import CheckpointReader
from moeserve.loader.resolve import resolve_checkpoint
from moeserve.loader.weights import load_weights
from moeserve.models.base import CausalLM
from moeserve.models.registry import model_class, parse_config
from moeserve.quant.apply import QuantPlan, describe_weight_bytes, quantize_model
from moeserve.quant.formats import FORMATS
from moeserve.quant.schemes import CheckpointScheme, detect_scheme, quantized_module_paths

logger = logging.getLogger(__name__)


def raw_config(name_or_path: str | Path) -> tuple[dict, Path | None, str]:
    if str(name_or_path) in presets.SHAPE_PRESETS:
        return presets.SHAPE_PRESETS[str(name_or_path)], None, f"preset {name_or_path}"
    folder = resolve_checkpoint(name_or_path)
    return read_config_json(folder), folder, str(folder / "config.json")


def load_config_and_scheme(name_or_path: str | Path) -> tuple[ModelConfig, CheckpointScheme | None]:
    """The model config, and the quantization scheme of the checkpoint (None: high precision).
    An unsupported scheme fails here, naming it."""
    raw, folder, source = raw_config(name_or_path)
    scheme = detect_scheme(raw, folder, source)
    return parse_config(raw, source), scheme


def load_config(name_or_path: str | Path) -> ModelConfig:
    return load_config_and_scheme(name_or_path)[0]


def checkpoint_quant_plan(config: ModelConfig, scheme: CheckpointScheme | None, reader: CheckpointReader) -> QuantPlan | None:
    """The modules a quantized checkpoint stores quantized (None for a high-precision one)."""
    if scheme is None:
        return None
    to_ours = model_class(config.architecture, "config").to_our_name
    linears, experts = quantized_module_paths(scheme, reader.names(), to_ours)
    return QuantPlan(scheme.format, frozenset(linears), frozenset(experts), scheme.block)


def load_model(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    quantization: str | None = None,
    parallel: ParallelOptions | None = None,
) -> CausalLM:
    """A checkpoint folder or preset name -> the model; `model(input_ids [B, S])` gives logits [B, S, V].
    Quantized checkpoints load in their own format; `quantization` (fp8, nvfp4) quantizes a
    high-precision checkpoint as it loads. With `parallel`, this rank builds and reads only its shard."""
    start = time.perf_counter()
    folder = resolve_checkpoint(name_or_path)
    config, scheme = load_config_and_scheme(folder)
    if quantization is not None:
        if quantization not in FORMATS:
            raise ConfigError(f"quantization must be one of {', '.join(FORMATS)}, got {quantization!r}")
        if scheme is not None:
            raise ConfigError(f"{folder} is already quantized ({scheme.name}); drop the quantization option")
    with CheckpointReader(folder) as reader:
        plan = checkpoint_quant_plan(config, scheme, reader)
        model = build_model(config, dtype, device, plan, parallel)
        load_weights(model, reader, scheme, progress)
    if quantization is not None:
        quantize_model(model, quantization)
    sizes = describe_weight_bytes(model)
    logger.info("Loaded %s (%s%s) in %.1f s on %s: weights %s", name_or_path, config.architecture,
                f", {scheme.name}" if scheme else (f", quantized to {quantization} on load" if quantization else ""),
                time.perf_counter() - start, device, sizes)
    return model
