"""Quantized checkpoint schemes: how each names and scales its tensors, and how to recognise it.

| scheme | config | per quantized linear |
|---|---|---|
| DeepSeek FP8 | quantization_config {quant_method: fp8, weight_block_size: [128, 128]} | weight (F8_E4M3), weight_scale_inv (F32 multiplier per block) |
| compressed-tensors FP8_BLOCK | quant_method compressed-tensors, format float-quantized, weights strategy block | weight (F8_E4M3), weight_scale (F32 multiplier per block) |
| ModelOpt NVFP4 | hf_quant_config.json quantization.quant_algo NVFP4, or quantization_config {quant_method: modelopt, quant_algo: NVFP4} | weight (U8 packed), weight_scale (F8_E4M3 per 16), weight_scale_2 (F32 global = amax / 2688), input_scale |
| compressed-tensors NVFP4 | quant_method compressed-tensors, format nvfp4-pack-quantized | weight_packed (U8), weight_scale (F8_E4M3), weight_global_scale (F32, the reciprocal: 2688 / amax), input_global_scale |

Which layers are quantized follows the checkpoint: a linear is quantized when its scale tensor (the
scheme's `marker`) is there. moeserve computes NVFP4 with 16-bit activations (W4A16), so input
scales are read past.
"""

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from moeserve.config import ConfigError


@dataclass(frozen=True)
class CheckpointScheme:
    name: str
    format: str  # "fp8" or "nvfp4"
    marker: str  # the suffix whose presence marks a quantized linear
    fields: dict[str, str]  # checkpoint suffix -> field of our QuantizedWeight
    reciprocal: frozenset[str] = frozenset()  # suffixes stored as 1 / our value
    ignored: frozenset[str] = frozenset()  # suffixes that exist but moeserve does not use
    block: tuple[int, int] = (128, 128)
    config: dict = field(default_factory=dict)  # quantization_config to write when exporting

    def suffix_of(self, our_field: str) -> str:
        return next(suffix for suffix, f in self.fields.items() if f == our_field)


DEEPSEEK_FP8 = CheckpointScheme(
    "fp8 (DeepSeek 128x128 blocks)", "fp8", "weight_scale_inv", {"weight": "values", "weight_scale_inv": "scale"},
    config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]})
COMPRESSED_TENSORS_FP8_BLOCK = CheckpointScheme(
    "compressed-tensors FP8_BLOCK", "fp8", "weight_scale", {"weight": "values", "weight_scale": "scale"},
    ignored=frozenset({"input_scale"}))
MODELOPT_NVFP4 = CheckpointScheme(
    "ModelOpt NVFP4", "nvfp4", "weight_scale_2",
    {"weight": "packed", "weight_scale": "block_scale", "weight_scale_2": "global_scale"},
    ignored=frozenset({"input_scale"}),
    config={"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16})
COMPRESSED_TENSORS_NVFP4 = CheckpointScheme(
    "compressed-tensors NVFP4", "nvfp4", "weight_global_scale",
    {"weight_packed": "packed", "weight_scale": "block_scale", "weight_global_scale": "global_scale"},
    reciprocal=frozenset({"weight_global_scale"}), ignored=frozenset({"input_global_scale"}))

EXPORT_SCHEMES = {"fp8": DEEPSEEK_FP8, "nvfp4": MODELOPT_NVFP4}
_SUPPORTED = ("fp8 with weight_block_size (DeepSeek), modelopt NVFP4, compressed-tensors FP8_BLOCK and NVFP4")


def detect_scheme(raw_config: dict, folder: Path | None, source: str) -> CheckpointScheme | None:
    config = raw_config.get("quantization_config")
    modelopt_file = folder / "hf_quant_config.json" if folder is not None else None
    if config is None and modelopt_file is not None and modelopt_file.is_file():
        config = {"quant_method": "modelopt", **json.loads(modelopt_file.read_text()).get("quantization", {})}
        source = str(modelopt_file)
    if config is None:
        return None
    method = config.get("quant_method")
    if method == "fp8":
        block = config.get("weight_block_size")
        if not block or len(block) != 2:
            raise ConfigError(f"{source}: fp8 checkpoints without weight_block_size (per-tensor FP8) are not supported; "
                              f"supported: {_SUPPORTED}")
        return replace(DEEPSEEK_FP8, block=tuple(block), config={**DEEPSEEK_FP8.config, "weight_block_size": list(block)})
    if method in ("modelopt", "modelopt_fp4"):
        algo = config.get("quant_algo")
        if algo != "NVFP4" or config.get("group_size", 16) != 16:
            raise ConfigError(f"{source}: modelopt quant_algo={algo!r} group_size={config.get('group_size')!r} is not "
                              f"supported; supported: {_SUPPORTED}")
        return MODELOPT_NVFP4
    if method == "compressed-tensors":
        return _compressed_tensors(config, source)
    raise ConfigError(f"{source}: quant_method={method!r} is not supported; supported: {_SUPPORTED}")


def _compressed_tensors(config: dict, source: str) -> CheckpointScheme:
    fmt = config.get("format")
    groups = list(config.get("config_groups", {}).values())
    weights = groups[0].get("weights", {}) if groups else {}
    if fmt == "nvfp4-pack-quantized":
        return COMPRESSED_TENSORS_NVFP4
    if fmt == "float-quantized" and weights.get("strategy") == "block" and weights.get("num_bits") == 8:
        block = tuple(weights.get("block_structure") or (128, 128))
        return replace(COMPRESSED_TENSORS_FP8_BLOCK, block=block)
    raise ConfigError(f"{source}: compressed-tensors format={fmt!r} with weights strategy={weights.get('strategy')!r} "
                      f"is not supported; supported: {_SUPPORTED}")


_EXPERT_PATH = re.compile(r"^(?P<prefix>.*\.experts)\.\d+\.(gate_proj|up_proj|down_proj)$")


def quantized_module_paths(scheme: CheckpointScheme, checkpoint_names, to_our_name) -> tuple[set[str], set[str]]:
    """(our paths of quantized linears, our paths of quantized Experts modules), from the marker tensors."""
    linears, experts = set(), set()
    suffix = "." + scheme.marker
    for name in checkpoint_names:
        if name.endswith(suffix):
            path = to_our_name(name)[: -len(suffix)]
            match = _EXPERT_PATH.match(path)
            if match:
                experts.add(match["prefix"])
            else:
                linears.add(path)
    return linears, experts
