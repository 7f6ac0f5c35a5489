"""load_model / load_config: a checkpoint folder or a built-in preset -> a ready model."""

import logging
import time
from pathlib import Path

import torch

from moeserve.config import QUANTIZATION_FORMATS, ConfigError, ModelConfig, parse_config, read_config_json
from moeserve.loader import presets
from moeserve.loader.checkpoint import CheckpointReader
from moeserve.loader.weights import load_weights
from moeserve.models.base import CausalLM
from moeserve.models.registry import model_class
from moeserve.distributed.parallelize import ParallelOptions, parallelize
from moeserve.quant.apply import QuantPlan, apply_plan, describe_weight_bytes, quantize_model
from moeserve.quant.formats import QuantizedWeight
from moeserve.quant.schemes import CheckpointScheme, detect_scheme, quantized_module_paths

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


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                plan: QuantPlan | None = None, parallel: ParallelOptions | None = None) -> CausalLM:
    """The model with uninitialised weights, allocated once: float parameters in `dtype` (router
    parameters that the reference keeps in fp32 stay fp32), quantized ones as the plan says, and with
    `parallel`, only this rank's shard."""
    with torch.device("meta"):
        model = model_class(config.architecture, "config")(config)
        if plan is not None:
            apply_plan(model, plan)
        if parallel is not None:
            parallelize(model, parallel.groups, parallel.dispatch_format, parallel.backend, torch.device(device), dtype)
    cast_float_params(model, dtype)
    model.to_empty(device=device)
    return model.requires_grad_(False).eval()


def cast_float_params(model: CausalLM, dtype: torch.dtype) -> None:
    """Float parameters to dtype, except those the reference keeps in fp32 and quantized data."""
    quantized = {id(p) for m in model.modules() if isinstance(m, QuantizedWeight) for p in m.parameters()}
    for module in model.modules():
        keep_fp32 = set(getattr(module, "fp32_params", ()))
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in quantized:
                param.data = param.data.to(torch.float32 if name in keep_fp32 else dtype)


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
        if quantization not in QUANTIZATION_FORMATS:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATION_FORMATS)}, got {quantization!r}")
        if scheme is not None:
            raise ConfigError(f"{folder} is already quantized ({scheme.name}); drop the quantization option")
        if parallel is not None and parallel.groups.layout.tp > 1:
            raise ConfigError("quantizing on load with tp > 1 is not supported yet; use --dp N --ep N, or "
                              "quantize first with `moeserve quantize` and load that with --ep")
    with CheckpointReader(folder) as reader:
        plan = None
        if scheme is not None:
            to_ours = model_class(config.architecture, "config").to_our_name
            linears, experts = quantized_module_paths(scheme, reader.names(), to_ours)
            plan = QuantPlan(scheme.format, frozenset(linears), frozenset(experts), scheme.block)
        model = build_model(config, dtype, device, plan, parallel)
        load_weights(model, reader, scheme, progress)
    if quantization is not None:
        quantize_model(model, quantization)
    sizes = describe_weight_bytes(model)
    logger.info("Loaded %s (%s%s) in %.1f s on %s: weights %s", name_or_path, config.architecture,
                f", {scheme.name}" if scheme else (f", quantized to {quantization} on load" if quantization else ""),
                time.perf_counter() - start, device, sizes)
    return model
