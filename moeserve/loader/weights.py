"""Checkpoint tensors <-> model parameters.

Loading is strict: every parameter must be filled exactly once, every checkpoint tensor must land
somewhere (or be one the family or the quantization scheme ignores), and shapes and dtypes must
match; each error names the tensor and its file. Experts load from per-expert keys
(`experts.{e}.gate_proj.weight`, ...) or from fused tensors (`experts.gate_up_proj`, `experts.down_proj`;
transposed for Llama 4). Quantized tensors are named by the checkpoint's scheme (quant/schemes.py).
"""

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from moeserve.loader.checkpoint import CheckpointError, CheckpointReader
from moeserve.models.base import CausalLM
from moeserve.quant.schemes import CheckpointScheme

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<suffix>\w+)$")
_FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_EXPERT_PARAM = re.compile(r"^(?P<base>.*\.experts\.(?P<proj>gate_up_proj|down_proj))(\.(?P<field>\w+))?$")
_PARTS = {"gate_proj": 0, "up_proj": 1}
_QUANTIZED_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8)


@dataclass
class Target:
    view: torch.Tensor  # the part of a parameter this tensor fills
    pieces: list[tuple]  # which pieces of the model it fills (for the missing / twice checks)
    transposed: bool = False
    reciprocal: bool = False
    shard: object = None  # a Shard: this rank reads only that slice of the checkpoint tensor
    expert_shard: object = None  # fused expert tensors: an ExpertShard (this rank's experts and intermediate slice)
    fused_gate_up: bool = False


SKIP = None  # locate's answer for a tensor that belongs to another rank


def expected_pieces(params: dict[str, torch.Tensor]) -> set[tuple]:
    """What loading must fill: whole parameters, and each expert's gate, up and down separately."""
    pieces = set()
    for name, param in params.items():
        match = _EXPERT_PARAM.match(name)
        if match is None:
            pieces.add((name,))
        elif match["proj"] == "gate_up_proj":
            pieces |= {(name, e, part) for e in range(param.shape[0]) for part in ("gate", "up")}
        else:
            pieces |= {(name, e, "down") for e in range(param.shape[0])}
    return pieces


def locate(model: CausalLM, ours: str, params: dict, scheme: CheckpointScheme | None) -> Target | None:
    """Our name of a checkpoint tensor -> where it goes (SKIP: another rank's). KeyError if nowhere."""
    specs = getattr(model, "shard_specs", {})
    field = None
    if m := _PER_EXPERT.match(ours):
        return locate_expert(m, params, scheme, specs.get(m["prefix"]))
    if (m := _FUSED.match(ours)) and ours in params:
        param, spec = params[ours], specs.get(m["prefix"])
        parts = ("gate", "up") if m["proj"] == "gate_up_proj" else ("down",)
        return Target(param, [(ours, e, part) for e in range(param.shape[0]) for part in parts],
                      transposed=model.fused_experts_transposed, expert_shard=spec,
                      fused_gate_up=m["proj"] == "gate_up_proj")
    module, _, suffix = ours.rpartition(".")
    if scheme is not None and suffix in scheme.fields:
        field = f"{module}.weight.{scheme.fields[suffix]}"
    if field in params:
        return Target(params[field], [(field,)], reciprocal=suffix in scheme.reciprocal, shard=specs.get(field))
    if ours in params:
        return Target(params[ours], [(ours,)], shard=specs.get(ours))
    raise KeyError(ours)


def locate_expert(m: re.Match, params: dict, scheme: CheckpointScheme | None, spec) -> Target | None:
    expert, proj, suffix = int(m["expert"]), m["proj"], m["suffix"]
    base = f"{m['prefix']}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
    part = "down" if proj == "down_proj" else proj.removesuffix("_proj")
    slot = expert if spec is None else spec.slot_of(expert)
    inner = None
    if spec is not None and spec.inner is not None:  # gate/up rows or down columns of this rank
        inner = dataclasses.replace(spec.inner, dim=1 if proj == "down_proj" else 0)
    if scheme is not None and suffix in scheme.fields and f"{base}.{scheme.fields[suffix]}" in params:
        name = f"{base}.{scheme.fields[suffix]}"
        if slot is None:
            return SKIP
        if slot < params[name].shape[0]:
            index = (slot,) if proj == "down_proj" else (slot, _PARTS[proj])
            return Target(params[name][index], [(name, slot, part)], reciprocal=suffix in scheme.reciprocal)
    elif suffix == "weight" and base in params:
        if slot is None:
            return SKIP
        if slot < params[base].shape[0]:
            if proj == "down_proj":
                return Target(params[base][slot], [(base, slot, part)], shard=inner)
            half = params[base].shape[1] // 2
            rows = slice(0, half) if part == "gate" else slice(half, 2 * half)
            return Target(params[base][slot, rows], [(base, slot, part)], shard=inner)
    raise KeyError(m.string)


def load_weights(model: CausalLM, reader: CheckpointReader, scheme: CheckpointScheme | None = None,
                 progress: bool = True) -> None:
    params = dict(model.named_parameters())
    pending = expected_pieces(params)
    tied_head = model.config.tie_word_embeddings
    for name in tqdm(reader.names(), desc="Loading weights", unit="tensor", disable=not progress):
        if model.is_ignored_checkpoint_key(name) or (tied_head and name == "lm_head.weight"):
            continue
        if scheme is not None and name.rpartition(".")[2] in scheme.ignored:
            continue
        try:
            target = locate(model, model.to_our_name(name), params, scheme)
        except KeyError:
            raise CheckpointError(f"{reader.path_of(name)}: unexpected tensor '{name}': the "
                                  f"{model.config.architecture} model has no parameter for it") from None
        if target is SKIP:
            continue
        check_shape(reader, name, target)
        if not pending.issuperset(target.pieces):
            raise CheckpointError(f"{reader.path_of(name)}: tensor '{name}' fills weights already loaded from "
                                  "another tensor (both per-expert and fused expert tensors?)")
        tensor = read(reader, name, target)
        check_dtype(reader, name, tensor, target.view)
        if target.reciprocal:
            tensor = 1.0 / tensor.float()
        if target.transposed:
            tensor = tensor.transpose(-1, -2)
        if target.expert_shard is not None and target.expert_shard.inner is not None:
            tensor = split_fused_intermediate(tensor, target.expert_shard.inner, target.fused_gate_up)
        with torch.no_grad():
            target.view.copy_(tensor.reshape(target.view.shape))
        pending.difference_update(target.pieces)
    if pending:
        missing = sorted(checkpoint_name_of(model, piece, scheme) for piece in pending)
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{reader.folder}: checkpoint is missing tensors: {shown}")


def read(reader: CheckpointReader, name: str, target: Target) -> torch.Tensor:
    """The checkpoint tensor, or only this rank's part of it."""
    if target.shard is not None:
        start, end = target.shard.bounds(reader.shape(name)[target.shard.dim])
        return reader.get_slice(name, target.shard.dim, start, end)
    experts = target.expert_shard
    if experts is None:
        return reader.get(name)
    if (span := experts.expert_range()) is not None:
        return reader.get_slice(name, 0, *span)
    return reader.get(name)[list(experts.experts)]


def split_fused_intermediate(tensor: torch.Tensor, inner, gate_up: bool) -> torch.Tensor:
    """[E, 2I, H] -> this rank's gate rows and up rows; [E, H, I] -> this rank's columns."""
    if not gate_up:
        start, end = inner.bounds(tensor.shape[2])
        return tensor[:, :, start:end]
    gate, up = tensor.chunk(2, dim=1)
    start, end = inner.bounds(gate.shape[1])
    return torch.cat((gate[:, start:end], up[:, start:end]), dim=1)


def check_shape(reader: CheckpointReader, name: str, target: Target) -> None:
    expected = list(target.view.shape)
    if target.expert_shard is not None:  # in our orientation: [E, 2I, H] or [E, H, I]
        expected[0] = target.expert_shard.num_experts
        if target.expert_shard.inner is not None:
            expected[1 if target.fused_gate_up else 2] *= target.expert_shard.inner.count
    if target.transposed:
        expected[-1], expected[-2] = expected[-2], expected[-1]
    if target.shard is not None:
        expected[target.shard.dim] *= target.shard.count
    found = reader.shape(name)
    if found != expected and not (expected == [] and found == [1]):
        raise CheckpointError(f"{reader.path_of(name)}: tensor '{name}' has shape {found}, the model expects {expected}")


def check_dtype(reader: CheckpointReader, name: str, tensor: torch.Tensor, view: torch.Tensor) -> None:
    """Quantized data must arrive in its exact dtype; float weights must not arrive quantized."""
    if view.dtype in _QUANTIZED_DTYPES and tensor.dtype != view.dtype:
        raise CheckpointError(f"{reader.path_of(name)}: tensor '{name}' is {tensor.dtype}, the checkpoint's "
                              f"quantization scheme needs {view.dtype}")
    if view.dtype not in _QUANTIZED_DTYPES and tensor.dtype in _QUANTIZED_DTYPES:
        raise CheckpointError(f"{reader.path_of(name)}: tensor '{name}' is quantized ({tensor.dtype}) but the model "
                              "expects it in high precision: the checkpoint's config declares no quantization "
                              "(or no scale tensor for this layer)")


def checkpoint_name_of(model: CausalLM, piece: tuple, scheme: CheckpointScheme | None) -> str:
    name = piece[0]
    match = _EXPERT_PARAM.match(name)
    if len(piece) == 3 and match and not (match["field"] is None and model.fused_experts_transposed):
        suffix = scheme.suffix_of(match["field"]) if match["field"] else "weight"
        prefix = match["base"].rsplit(".", 1)[0]
        spec = getattr(model, "shard_specs", {}).get(prefix)
        expert = piece[1] if spec is None else spec.experts[piece[1]]
        name = f"{prefix}.{expert}.{piece[2]}_proj.{suffix}"
    elif name.count(".weight.") == 1 and scheme is not None:
        module, _, field = name.rpartition(".weight.")
        name = f"{module}.{scheme.suffix_of(field)}"
    return model.to_checkpoint_name(name)


def export_state_dict(model: CausalLM, scheme: CheckpointScheme | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Our parameters under the family's checkpoint names and layout (per-expert keys, or Llama 4's
    transposed fused tensors), quantized ones under the scheme's names, as checkpoints store them."""
    for name, param in model.named_parameters():
        data = param.detach()
        match = _EXPERT_PARAM.match(name)
        if match and (match["field"] or not model.fused_experts_transposed):  # per-expert keys
            prefix = match["base"].rsplit(".", 1)[0]
            suffix = scheme.suffix_of(match["field"]) if match["field"] else "weight"
            for e, proj, tensor in per_expert(data, match["proj"], quantized=match["field"] is not None):
                yield model.to_checkpoint_name(f"{prefix}.{e}.{proj}.{suffix}"), tensor.contiguous()
        elif match:
            yield model.to_checkpoint_name(name), data.transpose(1, 2).contiguous()
        elif ".weight." in name and scheme is not None:  # a quantized linear's field
            module, _, field = name.rpartition(".weight.")
            yield model.to_checkpoint_name(f"{module}.{scheme.suffix_of(field)}"), data.contiguous()
        else:
            yield model.to_checkpoint_name(name), data.contiguous()


def per_expert(data: torch.Tensor, proj: str, quantized: bool) -> Iterator[tuple[int, str, torch.Tensor]]:
    """Fused expert data [E, ...] -> (expert, checkpoint projection, its tensor); quantized gate_up data
    keeps gate and up apart ([E, 2, ...]), plain gate_up stacks them ([E, 2I, H])."""
    for e in range(data.shape[0]):
        if proj == "down_proj":
            yield e, "down_proj", data[e]
            continue
        gate, up = (data[e, 0], data[e, 1]) if quantized else data[e].chunk(2, dim=0)
        yield e, "gate_proj", gate
        yield e, "up_proj", up
