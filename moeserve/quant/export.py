"""Writing a quantized checkpoint in a standard layout: DeepSeek FP8 (weight + weight_scale_inv) or
ModelOpt NVFP4 (weight, weight_scale, weight_scale_2), with the config that declares it.
NVFP4 exports carry no input scales: moeserve runs NVFP4 as W4A16, and W4A4 kernels need scales
calibrated on real activations, which quantizing from weights alone cannot give."""

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from moeserve.loader.weights import export_state_dict
from moeserve.models.base import CausalLM
from moeserve.quant.apply import QuantPlan
from moeserve.quant.schemes import EXPORT_SCHEMES

_COPIED = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
           "generation_config.json", "chat_template.jinja")
_MAX_SHARD_BYTES = 4 * 2**30


def write_quantized_checkpoint(model: CausalLM, plan: QuantPlan, source: Path, destination: Path) -> None:
    scheme = EXPORT_SCHEMES[plan.format]
    destination.mkdir(parents=True, exist_ok=False)
    write_shards(dict(export_state_dict(model, scheme)), destination)
    config = json.loads((source / "config.json").read_text())
    quant_config = dict(scheme.config)
    if plan.format == "nvfp4":
        quant_config["exclude_modules"] = high_precision_modules(model)
        (destination / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "moeserve", "version": "0.1.0"}, "quantization": quant_config}, indent=2))
    config["quantization_config"] = quant_config
    (destination / "config.json").write_text(json.dumps(config, indent=2))
    for name in _COPIED:
        if (source / name).is_file():
            shutil.copy(source / name, destination / name)


def high_precision_modules(model: CausalLM) -> list[str]:
    """The linear layers left unquantized (quantized ones are QuantLinears, not nn.Linear)."""
    from torch import nn

    kept = [path for path, module in model.named_modules() if isinstance(module, nn.Linear)]
    return sorted(model.to_checkpoint_name(path + ".weight").removesuffix(".weight") for path in kept)


def write_shards(tensors: dict, folder: Path) -> None:
    """One file, or shards of at most 4 GiB with a model.safetensors.index.json."""
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > _MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
