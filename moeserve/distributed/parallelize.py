"""Applying a parallel layout to a model built on the meta device, before its weights load.

The model code stays single-device: these functions swap modules for their sharded versions, set
each MoE layer's dispatcher, and record in `model.shard_specs` which slice of each checkpoint
tensor a parameter holds, so that every rank reads only its own part of the checkpoint.
"""

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moeserve.config import ConfigError
from moeserve.distributed.ep.dispatchers import DISPATCHERS, gather_padded
from moeserve.distributed.ep.peer_to_peer import PeerToPeerRank, PeerTransport
from moeserve.distributed.ep.rebalance import ep_nodes
from moeserve.distributed.eplb import balance
from moeserve.distributed.ep.token_formats import token_format
from moeserve.distributed.layout import ExpertMap, ParallelGroups
from moeserve.distributed.tensor_parallel import (QuantRowParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                                  VocabParallelLMHead)
from moeserve.layers.attention.gqa import GQAttention
from moeserve.layers.attention.mla import MLAttention
from moeserve.layers.linear import QuantLinear
from moeserve.layers.mlp import MLP
from moeserve.layers.moe.dispatch import Dispatcher, LocalDispatcher
from moeserve.layers.moe.experts import Experts
from moeserve.layers.moe.moe import MoE
from moeserve.models.base import CausalLM, replace_submodule
from moeserve.quant.apply import give_empty_quantized_weights
from moeserve.quant.formats import QuantizedWeight, make_quantized_weight
from moeserve.quant.nvfp4 import BLOCK as NVFP4_BLOCK

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelOptions:
    groups: ParallelGroups
    dispatch_format: str = "bf16"  # token format of EP dispatch: bf16 (unquantized), fp8, nvfp4
    backend: str = "auto"  # p2p for CUDA ranks within a node, else all_to_all; or any of them by name
    num_redundant_experts: int = 0  # extra expert replicas per MoE layer over the EP ranks (EPLB)
    ep_max_tokens_per_rank: int = 8192  # the p2p backend's buffers: tokens one rank may dispatch at once
    dist_timeout: float = 300.0  # seconds the p2p backend's device barrier waits for a rank before it traps
    ep_low_latency_tokens: int | None = None  # p2p: buffers for low-latency exchanges (decode graphs) of this many
    ep_micro_batches: int = 1  # p2p: exchanges in flight at once (two-batch overlap: 2), a buffer set each
    ep_comm_sms: int | None = None  # p2p: the puts' SMs, on a stream of their own; None: on the compute stream


@dataclass(frozen=True)
class Shard:
    """This rank holds part `index` of `count` equal parts of the checkpoint tensor along `dim`."""

    dim: int
    index: int
    count: int

    def bounds(self, size: int) -> tuple[int, int]:
        part = size // self.count
        return self.index * part, (self.index + 1) * part


@dataclass(frozen=True)
class ExpertShard:
    """The logical experts of this rank's slots, of `num_experts` in the checkpoint; with `inner`, also
    a slice of each expert's intermediate dimension (gate and up rows, down columns)."""

    experts: tuple[int, ...]
    num_experts: int
    inner: Shard | None = None

    def slot_of(self, expert: int) -> int | None:
        return self.experts.index(expert) if expert in self.experts else None

    def expert_range(self) -> tuple[int, int] | None:
        """(first, end) when the experts are consecutive ids (the contiguous map), else None."""
        first = self.experts[0]
        return (first, first + len(self.experts)) if self.experts == tuple(range(first, first + len(self.experts))) else None


def resolve_ep_backend(backend: str, device, ep: int, ranks_per_node: int | None = None) -> str:
    """auto: the peer-to-peer transport for an EP group of CUDA ranks within one node (ranks_per_node: torchrun's
    LOCAL_WORLD_SIZE unless given; spawned ranks share one node) whose GPUs reach each other's memory, NCCL
    all-to-all otherwise."""
    if backend != "auto":
        return backend
    per_node = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", ep))
    one_node = 1 < ep <= per_node and per_node % ep == 0  # consecutive groups of ep ranks never straddle a node
    device = torch.device(device)
    if not one_node or device.type not in ("cuda", "meta"):
        return "all_to_all"
    return "p2p" if device.type == "meta" or peers_reachable(ep) else "all_to_all"


def peers_reachable(ep: int) -> bool:
    """Whether the node's first `ep` GPUs (those of an EP group of spawned or torchrun ranks) can all access each
    other's memory (NVLink or PCIe peer access), as peer-to-peer puts need. Ranks that each see one GPU
    (CUDA_VISIBLE_DEVICES per rank) cannot tell from here: True, and symmetric memory's rendezvous decides."""
    gpus = min(ep, torch.cuda.device_count())
    return all(torch.cuda.can_device_access_peer(a, b) for a in range(gpus) for b in range(gpus) if a != b)


def parallelize(model: CausalLM, groups: ParallelGroups, dispatch_format: str = "bf16",
                backend: str = "auto", device="cpu", dtype=torch.float32, num_redundant_experts: int = 0,
                ep_max_tokens_per_rank: int = 8192, dist_timeout: float = 300.0,
                ep_low_latency_tokens: int | None = None, ep_micro_batches: int = 1,
                ep_comm_sms: int | None = None) -> None:
    layout = groups.layout
    layout.check_model(model.config)
    backend = resolve_ep_backend(backend, device, layout.ep)
    if num_redundant_experts and layout.ep == 1:
        raise ConfigError("redundant experts need expert parallelism (--ep > 1): with one EP rank every expert is local")
    if backend not in (*DISPATCHERS, "p2p"):
        raise ConfigError(f"unknown EP backend {backend!r} (known: auto, {', '.join(DISPATCHERS)}, p2p)")
    if ep_comm_sms is not None and backend != "p2p":
        raise ConfigError(f"--ep-comm-sms sizes the p2p backend's put stream, and this EP group's backend is {backend} "
                          f"(p2p needs CUDA ranks of one node): drop --ep-comm-sms")
    if ep_micro_batches > 1 and backend != "p2p" and layout.ep > 1:
        logger.warning("two-batch overlap with the %s EP backend: its exchanges happen whole in their send half, so "
                       "nothing overlaps (the p2p backend, CUDA ranks of one node, overlaps them)", backend)
    transport = None
    if backend == "p2p" and layout.ep > 1:
        if torch.device(device).type not in ("cuda", "meta"):
            raise ConfigError("the p2p EP backend puts tokens through GPU peer memory: it needs CUDA devices "
                              "(use all_to_all on the CPU)")
        if ep_nodes(layout.ep) > 1:
            raise ConfigError(f"the p2p EP backend maps peer memory within one node, and this EP group of {layout.ep} "
                              f"ranks spans {ep_nodes(layout.ep)}: use all_to_all, or an --ep within one node")
        transport = PeerTransport(groups.ep_group, layout.ep, ep_max_tokens_per_rank, dist_timeout,
                                  ep_low_latency_tokens, ep_micro_batches, ep_comm_sms)
    token_format(dispatch_format)  # an unknown format fails here
    specs: dict = {}
    if layout.tp > 1:
        shard_dense_parts(model, groups, specs)
    for path, moe in [(p, m) for p, m in model.named_modules() if isinstance(m, MoE)]:
        if layout.ep > 1:
            expert_map = initial_expert_map(moe.moe.num_experts, layout.ep, num_redundant_experts)
            shard_experts_over_ranks(moe, path, groups, expert_map, dispatch_format, backend, device, dtype, specs,
                                     transport)
        elif layout.tp > 1:
            split_experts_intermediate(moe, path, groups, specs)
    model.shard_specs = specs


def column(model, path: str, tp_rank: int, tp: int, specs: dict) -> None:
    linear = model.get_submodule(path)
    _require_linear(linear, path)
    if linear.out_features % tp:
        raise ConfigError(f"{path}: {linear.out_features} output features cannot be split over tp={tp}")
    out_features = linear.out_features // tp
    if isinstance(linear, QuantLinear):
        replace_submodule(model, path, QuantLinear(sharded_weight(linear.weight, path, 0, out_features, tp),
                                                   sliced_bias(linear.bias, out_features)))
        record_weight_shards(specs, path, linear.weight, Shard(0, tp_rank, tp))
    else:
        replace_submodule(model, path, nn.Linear(linear.in_features, out_features, linear.bias is not None))
        specs[f"{path}.weight"] = Shard(0, tp_rank, tp)
    if linear.bias is not None:
        specs[f"{path}.bias"] = Shard(0, tp_rank, tp)


def row(model, path: str, groups: ParallelGroups, specs: dict) -> None:
    linear, tp = model.get_submodule(path), groups.layout.tp
    _require_linear(linear, path)
    if linear.in_features % tp:
        raise ConfigError(f"{path}: {linear.in_features} input features cannot be split over tp={tp}")
    in_features = linear.in_features // tp
    if isinstance(linear, QuantLinear):
        replace_submodule(model, path, QuantRowParallelLinear(sharded_weight(linear.weight, path, 1, in_features, tp),
                                                              linear.bias, groups.tp_group))
        record_weight_shards(specs, path, linear.weight, Shard(1, groups.tp_rank, tp))
        return
    replace_submodule(model, path, RowParallelLinear(in_features, linear.out_features, linear.bias is not None,
                                                     groups.tp_group))
    specs[f"{path}.weight"] = Shard(1, groups.tp_rank, tp)


def _require_linear(linear: nn.Module, path: str) -> None:
    if not isinstance(linear, (nn.Linear, QuantLinear)):
        raise ConfigError(f"{path}: a {type(linear).__name__} cannot be split over tp; "
                          "use data-parallel attention with expert parallelism (--dp N --ep N)")


SHARDED_FIELDS = {"fp8": ("values", "scale"), "nvfp4": ("packed", "block_scale")}  # the rest (a global scale) is whole


def quantization_unit(weight: QuantizedWeight, dim: int) -> int:
    """Features along dim (0: output, 1: input) that share one scale."""
    if weight.format == "fp8":
        return weight.block[dim]
    return NVFP4_BLOCK if dim == 1 else 1


def sharded_weight(weight: QuantizedWeight, path: str, dim: int, part: int, tp: int) -> QuantizedWeight:
    """An empty quantized weight for this rank's `part` features along dim, which must be whole scale blocks."""
    unit = quantization_unit(weight, dim)
    if part % unit:
        side = "output" if dim == 0 else "input"
        raise ConfigError(f"{path}: {part} {side} features per rank (tp={tp}) are not whole {weight.format} "
                          f"scale blocks of {unit}; use a tp that divides the features into multiples of {unit}, or "
                          "data-parallel attention with expert parallelism (--dp N --ep N)")
    shape = list(weight.shape)
    shape[dim] = part
    with torch.device(next(weight.parameters()).device):
        return make_quantized_weight(weight.format, tuple(shape), getattr(weight, "block", (128, 128)))


def sliced_bias(bias: nn.Parameter | None, size: int) -> nn.Parameter | None:
    if bias is None:
        return None
    return nn.Parameter(torch.empty(size, dtype=bias.dtype, device=bias.device), requires_grad=False)


def record_weight_shards(specs: dict, path: str, weight: QuantizedWeight, shard: Shard) -> None:
    """The quantized data and its block scales split like the weight (same dim: rows, or columns / scale blocks)."""
    for field in SHARDED_FIELDS[weight.format]:
        specs[f"{path}.weight.{field}"] = shard


def shard_dense_parts(model: CausalLM, groups: ParallelGroups, specs: dict) -> None:
    """Attention heads, dense MLPs and shared experts over tp; vocabulary-parallel embedding and head."""
    tp, tp_rank = groups.layout.tp, groups.tp_rank
    for path, module in list(model.named_modules()):
        if isinstance(module, GQAttention):
            for name in ("q_proj", "k_proj", "v_proj"):
                column(model, f"{path}.{name}", tp_rank, tp, specs)
            row(model, f"{path}.o_proj", groups, specs)
        elif isinstance(module, MLAttention):
            column(model, f"{path}.{'q_proj' if module.mla.q_lora_rank is None else 'q_b_proj'}", tp_rank, tp, specs)
            column(model, f"{path}.kv_b_proj", tp_rank, tp, specs)
            row(model, f"{path}.o_proj", groups, specs)
            module.num_heads //= tp
        elif isinstance(module, MLP):
            column(model, f"{path}.gate_proj", tp_rank, tp, specs)
            column(model, f"{path}.up_proj", tp_rank, tp, specs)
            row(model, f"{path}.down_proj", groups, specs)
    config = model.config
    if config.vocab_size % tp:
        raise ConfigError(f"vocabulary size {config.vocab_size} cannot be split over tp={tp}")
    part = config.vocab_size // tp
    model.model.embed_tokens = VocabParallelEmbedding(part, config.hidden_size, tp_rank * part, groups.tp_group)
    model.lm_head = VocabParallelLMHead(config.hidden_size, part, groups.tp_group, tp)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    specs["model.embed_tokens.weight"] = specs["lm_head.weight"] = Shard(0, tp_rank, tp)


def resized_experts(experts: Experts, num_experts: int, intermediate: int) -> Experts:
    """An Experts module like `experts` (plain or quantized) with other sizes."""
    new = Experts(num_experts, experts.gate_up_proj.shape[-1], intermediate)
    if isinstance(experts.gate_up_proj, QuantizedWeight):
        give_empty_quantized_weights(new, experts.gate_up_proj.format, getattr(experts.gate_up_proj, "block", (128, 128)))
    return new


def initial_expert_map(num_experts: int, ep: int, num_redundant: int) -> ExpertMap:
    """Contiguous without redundant experts; with them, the balancer's placement for a uniform load (until the
    first rebalancing has counted the real one)."""
    if not num_redundant:
        return ExpertMap.contiguous(num_experts, ep)
    with torch.device("cpu"):  # models are built under the meta device
        placement = balance(torch.ones(num_experts), num_experts + num_redundant, ep)
    return ExpertMap(tuple(placement.physical_to_logical[0].tolist()), ep)


def shard_experts_over_ranks(moe: MoE, path: str, groups: ParallelGroups, expert_map: ExpertMap, dispatch_format: str,
                             backend: str, device, dtype, specs: dict, transport=None) -> None:
    """transport: the p2p backend's buffers, shared by every layer of the rank."""
    layout = groups.layout
    local = expert_map.local_experts(groups.ep_rank)
    moe.experts = resized_experts(moe.experts, len(local), moe.moe.intermediate_size)
    specs[f"{path}.experts"] = ExpertShard(tuple(local), moe.moe.num_experts)
    if backend == "p2p":
        dispatcher = PeerToPeerRank(expert_map, groups.ep_rank, dispatch_format, transport, device, dtype)
    else:
        dispatcher = DISPATCHERS[backend](expert_map, groups.ep_group, groups.ep_rank, dispatch_format, device, dtype)
    if layout.tp > 1:
        dispatcher = TokenSplitDispatcher(dispatcher, groups.tp_group, groups.tp_rank, layout.tp)
    moe.dispatcher = dispatcher


def split_experts_intermediate(moe: MoE, path: str, groups: ParallelGroups, specs: dict) -> None:
    tp = groups.layout.tp
    if isinstance(moe.experts.gate_up_proj, QuantizedWeight):
        raise ConfigError(f"{path}: splitting quantized experts over tp is not supported yet; use --ep")
    moe.experts = resized_experts(moe.experts, moe.moe.num_experts, moe.moe.intermediate_size // tp)
    specs[f"{path}.experts"] = ExpertShard(tuple(range(moe.moe.num_experts)), moe.moe.num_experts,
                                           Shard(0, groups.tp_rank, tp))
    moe.dispatcher = SummingDispatcher(moe.dispatcher, groups.tp_group)


class SummingDispatcher(Dispatcher):
    """Experts split along their intermediate size: each rank's combine is a partial sum."""

    def __init__(self, inner: LocalDispatcher, group):
        self.inner, self.group = inner, group

    def dispatch(self, x, topk_ids, topk_weights):
        return self.inner.dispatch(x, topk_ids, topk_weights)

    def combine(self, y, handle):
        out = self.inner.combine(y, handle)
        dist.all_reduce(out, group=self.group)
        return out


class TokenSplitDispatcher(Dispatcher):
    """TP attention + EP MoE: the tp ranks of a group hold the same tokens; each dispatches its own
    contiguous share, and the results are gathered back over the group. The inner dispatcher's halves stay halves."""

    def __init__(self, inner, group, tp_rank: int, tp: int):
        self.inner, self.group, self.tp_rank, self.tp = inner, group, tp_rank, tp

    def dispatch_send(self, x, topk_ids, topk_weights, micro_batch: int = 0):
        share = -(-x.shape[0] // self.tp)
        mine = slice(self.tp_rank * share, (self.tp_rank + 1) * share)
        return self.inner.dispatch_send(x[mine], topk_ids[mine], topk_weights[mine], micro_batch), share, x.shape[0]

    def dispatch_recv(self, sent):
        inner_sent, share, num_tokens = sent
        rows, layout, handle = self.inner.dispatch_recv(inner_sent)
        return rows, layout, (handle, share, num_tokens)

    def combine_send(self, y, handle):
        inner_handle, share, num_tokens = handle
        return self.inner.combine_send(y, inner_handle), share, num_tokens

    def combine_recv(self, sent):
        inner_sent, share, num_tokens = sent
        return gather_padded(self.inner.combine_recv(inner_sent), share, self.group)[:num_tokens]

    def results_buffer(self, handle):
        return self.inner.results_buffer(handle[0])

    def dispatch(self, x, topk_ids, topk_weights):
        return self.dispatch_recv(self.dispatch_send(x, topk_ids, topk_weights))

    def combine(self, y, handle):
        return self.combine_recv(self.combine_send(y, handle))
