"""Checkpoint tensors <-> model parameters.

Loading is strict: every parameter must be filled exactly once, every checkpoint tensor must land
somewhere (or be one the family ignores), and shapes must match; each error names the tensor and
its file. Experts load from per-expert keys (`experts.{e}.gate_proj.weight`, ...) or from fused
tensors (`experts.gate_up_proj`, `experts.down_proj`; transposed for Llama 4).
"""

import re
from collections.abc import Iterator

import torch
from tqdm import tqdm

from moeserve.loader.checkpoint import CheckpointError, CheckpointReader
from moeserve.models.base import CausalLM

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


def expected_pieces(params: dict[str, torch.Tensor]) -> set[tuple]:
    """What loading must fill: whole parameters, and each expert's gate, up and down separately."""
    pieces = set()
    for name, param in params.items():
        if name.endswith("experts.gate_up_proj"):
            pieces |= {(name, e, part) for e in range(param.shape[0]) for part in ("gate", "up")}
        elif name.endswith("experts.down_proj"):
            pieces |= {(name, e, "down") for e in range(param.shape[0])}
        else:
            pieces.add((name,))
    return pieces


def locate(model: CausalLM, ours: str, params: dict) -> tuple[torch.Tensor, list[tuple], bool]:
    """Our name of a checkpoint tensor -> (the view of a parameter to fill, pieces it fills, transposed)."""
    if m := _PER_EXPERT.match(ours):
        expert = int(m["expert"])
        if m["proj"] == "down_proj":
            name = f"{m['prefix']}.down_proj"
            if name in params and expert < params[name].shape[0]:
                return params[name][expert], [(name, expert, "down")], False
        else:
            name = f"{m['prefix']}.gate_up_proj"
            if name in params and expert < params[name].shape[0]:
                half = params[name].shape[1] // 2
                part = "gate" if m["proj"] == "gate_proj" else "up"
                rows = slice(0, half) if part == "gate" else slice(half, 2 * half)
                return params[name][expert, rows], [(name, expert, part)], False
    elif (m := _FUSED.match(ours)) and ours in params:
        param = params[ours]
        parts = ("gate", "up") if m["proj"] == "gate_up_proj" else ("down",)
        pieces = [(ours, e, part) for e in range(param.shape[0]) for part in parts]
        return param, pieces, model.fused_experts_transposed
    elif ours in params:
        return params[ours], [(ours,)], False
    raise KeyError(ours)


def load_weights(model: CausalLM, reader: CheckpointReader, progress: bool = True) -> None:
    params = dict(model.named_parameters())
    pending = expected_pieces(params)
    tied_head = model.config.tie_word_embeddings
    for name in tqdm(reader.names(), desc="Loading weights", unit="tensor", disable=not progress):
        if model.is_ignored_checkpoint_key(name) or (tied_head and name == "lm_head.weight"):
            continue
        ours = model.to_our_name(name)
        try:
            view, pieces, transposed = locate(model, ours, params)
        except KeyError:
            raise CheckpointError(f"{reader.path_of(name)}: unexpected tensor '{name}': the "
                                  f"{model.config.architecture} model has no parameter for it") from None
        expected = list(view.transpose(-1, -2).shape if transposed else view.shape)
        if reader.shape(name) != expected:
            raise CheckpointError(f"{reader.path_of(name)}: tensor '{name}' has shape {reader.shape(name)}, "
                                  f"the model expects {expected}")
        if not pending.issuperset(pieces):
            raise CheckpointError(f"{reader.path_of(name)}: tensor '{name}' fills weights already loaded from "
                                  "another tensor (both per-expert and fused expert tensors?)")
        tensor = reader.get(name)
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8) and view.is_floating_point():
            raise CheckpointError(f"{reader.path_of(name)}: tensor '{name}' is quantized ({tensor.dtype}) but the "
                                  "checkpoint's config declares no quantization moeserve understands")
        with torch.no_grad():
            view.copy_(tensor.transpose(-1, -2) if transposed else tensor)
        pending.difference_update(pieces)
    if pending:
        missing = sorted(checkpoint_name_of(model, piece) for piece in pending)
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{reader.folder}: checkpoint is missing tensors: {shown}")


def checkpoint_name_of(model: CausalLM, piece: tuple) -> str:
    name = piece[0]
    if len(piece) == 3 and not model.fused_experts_transposed:
        prefix = name.rsplit(".", 1)[0]
        name = f"{prefix}.{piece[1]}.{piece[2]}_proj.weight"
    return model.to_checkpoint_name(name)


def export_state_dict(model: CausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """Our parameters under the family's checkpoint names and layout (per-expert keys, or Llama 4's
    transposed fused tensors), as transformers' save_pretrained writes them."""
    for name, param in model.named_parameters():
        data = param.detach()
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            if model.fused_experts_transposed:
                yield model.to_checkpoint_name(name), data.transpose(1, 2).contiguous()
                continue
            prefix = name.rsplit(".", 1)[0]
            for e in range(data.shape[0]):
                if name.endswith("gate_up_proj"):
                    gate, up = data[e].chunk(2, dim=0)
                    yield model.to_checkpoint_name(f"{prefix}.{e}.gate_proj.weight"), gate.contiguous()
                    yield model.to_checkpoint_name(f"{prefix}.{e}.up_proj.weight"), up.contiguous()
                else:
                    yield model.to_checkpoint_name(f"{prefix}.{e}.down_proj.weight"), data[e].contiguous()
        else:
            yield model.to_checkpoint_name(name), data.contiguous()
