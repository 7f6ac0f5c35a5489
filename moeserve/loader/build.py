"""build_model: a ModelConfig -> the family's model, allocated once, with uninitialised weights.

Quantization plans and parallelism are applied on the meta device before allocation; the loader, the
presets and memory planning all build models here."""

import torch

from moeserve.config import ModelConfig
from moeserve.distributed.parallelize import ParallelOptions, parallelize
from moeserve.models.base import CausalLM
from moeserve.models.registry import model_class
from moeserve.quant.apply import QuantPlan, apply_plan, default_plan, weight_bytes_by_format
from moeserve.quant.formats import QuantizedWeight


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
            parallelize(model, parallel.groups, parallel.dispatch_format, parallel.backend, torch.device(device), dtype,
                        parallel.num_redundant_experts, parallel.ep_max_tokens_per_rank, parallel.dist_timeout,
                        parallel.ep_low_latency_tokens, parallel.ep_micro_batches, parallel.ep_comm_sms)
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


def planned_weight_bytes(config: ModelConfig, fmt: str | None) -> dict[str, int]:
    """Weight bytes per format of a model quantized with quantize-on-load's plan (bf16 otherwise),
    computed on the meta device: nothing is allocated."""
    model = build_model(config, torch.bfloat16, device="meta")
    if fmt is not None:
        with torch.device("meta"):
            apply_plan(model, default_plan(model, fmt))
    return weight_bytes_by_format(model)
