"""load_model / load_config: a checkpoint folder or a built-in preset -> a ready model."""

import logging
import time
from pathlib import Path

import torch

from moeserve.config import ConfigError, ModelConfig, parse_config, read_config_json
from moeserve.loader import presets
from moeserve.loader.checkpoint import CheckpointReader
from moeserve.loader.weights import load_weights
from moeserve.models.base import CausalLM
from moeserve.models.registry import model_class

logger = logging.getLogger(__name__)


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A checkpoint folder, or the folder of a tiny preset (written on first use)."""
    if str(name_or_path) in presets.TINY_PRESETS:
        return presets.materialize(str(name_or_path))
    if str(name_or_path) in presets.SHAPE_PRESETS:
        raise ConfigError(f"'{name_or_path}' is a config-only preset (real shapes, no weights): use "
                          "moeserve.load_config for its config, or build_model + random_init for benchmarks")
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"'{name_or_path}' is neither a checkpoint folder nor a preset "
                          f"(presets: {', '.join(presets.all_names())})")
    return path


def load_config(name_or_path: str | Path) -> ModelConfig:
    if str(name_or_path) in presets.SHAPE_PRESETS:
        return parse_config(presets.SHAPE_PRESETS[str(name_or_path)], f"preset {name_or_path}")
    folder = resolve_checkpoint(name_or_path)
    raw = read_config_json(folder)
    if "quantization_config" in raw:
        method = raw["quantization_config"].get("quant_method", "?")
        raise ConfigError(f"{folder / 'config.json'}: quantized checkpoints (quant_method={method!r}) are not "
                          "supported yet; use a bf16 checkpoint")
    return parse_config(raw, str(folder / "config.json"))


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> CausalLM:
    """The model with uninitialised weights, allocated once, in `dtype` (router parameters that the
    reference keeps in fp32 stay fp32)."""
    with torch.device("meta"):
        model = model_class(config.architecture, "config")(config)
    model.to(dtype)
    for module in model.modules():
        for name in getattr(module, "fp32_params", ()):
            getattr(module, name).data = getattr(module, name).data.float()
    model.to_empty(device=device)
    return model.requires_grad_(False).eval()


def load_model(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> CausalLM:
    """A checkpoint folder or preset name -> the model; `model(input_ids [B, S])` gives logits [B, S, V]."""
    start = time.perf_counter()
    folder = resolve_checkpoint(name_or_path)
    config = load_config(folder)
    model = build_model(config, dtype, device)
    with CheckpointReader(folder) as reader:
        load_weights(model, reader, progress)
    num_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info("Loaded %s (%s) in %.1f s: %.1f MiB of weights in %s on %s", name_or_path, config.architecture,
                time.perf_counter() - start, num_bytes / 2**20, dtype, device)
    return model
