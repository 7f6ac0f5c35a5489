"""Putting quantized weights into a model: swap modules for a checkpoint's plan (before allocation),
or quantize a loaded high-precision model in place (quantize on load)."""

import logging
from dataclasses import dataclass

import torch
from torch import nn

from moeserve.distributed.tensor_parallel import QuantRowParallelLinear, RowParallelLinear
from moeserve.layers.linear import QuantLinear
from moeserve.layers.moe.experts import Experts
from moeserve.models.base import replace_submodule
from moeserve.quant.formats import QuantizedWeight, make_quantized_weight
from moeserve.quant.nvfp4 import BLOCK as NVFP4_BLOCK

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantPlan:
    format: str
    linears: frozenset[str]  # module paths of quantized Linear layers
    experts: frozenset[str]  # module paths of quantized Experts modules
    block: tuple[int, int] = (128, 128)


def apply_plan(model: nn.Module, plan: QuantPlan) -> None:
    """Give the planned modules quantized weights (empty: loading fills them)."""
    for path in sorted(plan.linears):
        linear = model.get_submodule(path)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{path} is quantized in the checkpoint but is not a linear layer of this model")
        replace_submodule(model, path, empty_quantized_linear(linear, plan.format, plan.block))
    for path in sorted(plan.experts):
        give_empty_quantized_weights(model.get_submodule(path), plan.format, plan.block)


def empty_quantized_linear(linear: nn.Linear, fmt: str, block: tuple[int, int] = (128, 128)) -> QuantLinear:
    """A QuantLinear of the linear's shape and bias, on its device; the weight is not filled."""
    with torch.device(linear.weight.device):
        weight = make_quantized_weight(fmt, (linear.out_features, linear.in_features), block)
    return QuantLinear(weight, linear.bias)


def give_empty_quantized_weights(experts: Experts, fmt: str, block: tuple[int, int] = (128, 128)) -> None:
    """Swap the experts' plain weights for unfilled quantized ones of the same sizes (gate and up apart)."""
    num_experts, two_i, hidden = experts.gate_up_proj.shape
    with torch.device(experts.gate_up_proj.device):
        gate_up = make_quantized_weight(fmt, (num_experts, 2, two_i // 2, hidden), block)
        down = make_quantized_weight(fmt, (num_experts, hidden, two_i // 2), block)
    del experts.gate_up_proj, experts.down_proj
    experts.gate_up_proj, experts.down_proj = gate_up, down


def default_plan(model: nn.Module, fmt: str) -> QuantPlan:
    """What quantize-on-load quantizes: every linear inside the decoder layers and every expert; the
    router, norms, embeddings, lm head and Qwen2's one-output shared-expert gate stay as they are.
    NVFP4 leaves a layer whose input size is not a multiple of 16 in high precision."""
    def fits(in_features: int) -> bool:
        return fmt != "nvfp4" or in_features % NVFP4_BLOCK == 0

    linears, experts, kept = set(), set(), []
    for path, module in model.named_modules():
        if not path.startswith("model.layers."):
            continue
        if isinstance(module, nn.Linear) and not path.endswith("shared_expert_gate"):
            (linears.add(path) if fits(module.in_features) else kept.append(path))
        elif isinstance(module, Experts):
            _, two_i, hidden = module.gate_up_proj.shape
            (experts.add(path) if fits(hidden) and fits(two_i // 2) else kept.append(path))
    if kept:
        logger.warning("kept in high precision (input size not a multiple of %d): %s", NVFP4_BLOCK, ", ".join(kept))
    return QuantPlan(fmt, frozenset(linears), frozenset(experts))


@torch.no_grad()
def quantize_model(model: nn.Module, fmt: str) -> QuantPlan:
    """Quantize a loaded model's weights in place, layer by layer. On a tensor-parallel rank each
    linear and expert quantizes its own shard, with scales of its own."""
    plan = default_plan(model, fmt)
    for path in sorted(plan.linears):
        linear = model.get_submodule(path)
        quantized = empty_quantized_linear(linear, fmt)
        quantized.weight.quantize_from(linear.weight)
        if isinstance(linear, RowParallelLinear):  # a rank's slice of the inputs: its partial sums still add up
            quantized = QuantRowParallelLinear(quantized.weight, quantized.bias, linear.group)
        replace_submodule(model, path, quantized)
    for path in sorted(plan.experts):
        experts = model.get_submodule(path)
        gate_up, down = experts.gate_up_proj, experts.down_proj
        give_empty_quantized_weights(experts, fmt)
        experts.gate_up_proj.quantize_from(gate_up)
        experts.down_proj.quantize_from(down)
    return plan


def describe_weight_bytes(model: nn.Module) -> str:
    return ", ".join(f"{fmt} {size / 2**20:.1f} MiB" for fmt, size in sorted(weight_bytes_by_format(model).items()))


def weight_bytes_by_format(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters, grouped by the format that holds them (a float dtype or a quantized format)."""
    totals: dict[str, int] = {}
    quantized_params = set()
    for module in model.modules():
        if isinstance(module, QuantizedWeight):
            size = sum(p.numel() * p.element_size() for p in module.parameters())
            totals[module.format] = totals.get(module.format, 0) + size
            quantized_params |= {id(p) for p in module.parameters()}
    for p in model.parameters():
        if id(p) not in quantized_params:
            key = str(p.dtype).removeprefix("torch.")
            totals[key] = totals.get(key, 0) + p.numel() * p.element_size()
    return totals

