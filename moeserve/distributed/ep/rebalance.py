"""Rebalancing the experts of a running model over its EP group: the load counted since the last
rebalancing, summed over the group, gives a new placement (moeserve.distributed.eplb); each rank then
receives the weights of the experts it gains from the lowest rank that held them, as they are (bit for
bit), into the same parameter storage, and the dispatchers read the new map. Every rank of the group
computes the same placement from the same sums, so no rank waits on a plan it does not know.
"""

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeserve.config import ConfigError
from moeserve.distributed.ep.dispatchers import ExpertParallelDispatcher
from moeserve.distributed.eplb import Placement, balance, imbalance, rank_load
from moeserve.distributed.layout import ExpertMap
from moeserve.layers.moe.moe import MoE

logger = logging.getLogger(__name__)

MIN_GAIN = 0.01  # a layer's experts move only when that lowers its max/mean tokens per rank by at least this


@dataclass(frozen=True)
class Rebalancing:
    before: list[float]  # max / mean tokens per EP rank of each MoE layer, with the old placement
    after: list[float]  # the same load with the new placement
    moved_experts: int  # expert weights received, over the group


def ep_nodes(ep: int) -> int:
    """The nodes an EP group (ep consecutive ranks) spans: torchrun puts LOCAL_WORLD_SIZE ranks on each node; spawned
    ranks share one."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", ep))
    return ep // per_node if ep > per_node and ep % per_node == 0 else 1


def expert_dispatcher(moe: MoE) -> ExpertParallelDispatcher | None:
    dispatcher = moe.dispatcher
    while not isinstance(dispatcher, ExpertParallelDispatcher) and hasattr(dispatcher, "inner"):
        dispatcher = dispatcher.inner
    return dispatcher if isinstance(dispatcher, ExpertParallelDispatcher) else None


def expert_parallel_layers(model) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE) and expert_dispatcher(m) is not None]


def placement_of(maps: list[ExpertMap]) -> Placement:
    physical = torch.tensor([m.logical_of_slot for m in maps], dtype=torch.long)
    counts = torch.stack([torch.bincount(row, minlength=maps[0].num_experts) for row in physical])
    return Placement(physical, counts, maps[0].num_ranks)


def rebalance(layers: list[MoE], load: torch.Tensor, group, ep_rank: int, num_groups: int = 1,
              num_nodes: int = 1) -> Rebalancing:
    """load: [layers, E] tokens per logical expert since the last rebalancing, on this rank (summed here).
    num_groups: the router's expert groups; num_nodes: the nodes the EP ranks span (hierarchical placement when
    the groups split evenly over them)."""
    load = load.clone()
    dist.all_reduce(load, group=group)
    load = load.cpu().double()
    dispatchers = [expert_dispatcher(moe) for moe in layers]
    old = placement_of([d.expert_map for d in dispatchers])
    new = balance(load, old.physical_to_logical.shape[1], old.num_ranks, num_groups, num_nodes)
    before, after = imbalance(rank_load(load, old)), imbalance(rank_load(load, new))
    moved = 0
    for layer, (moe, dispatcher) in enumerate(zip(layers, dispatchers)):
        if load[layer].sum() == 0 or after[layer] > before[layer] - MIN_GAIN:
            after[layer] = before[layer]  # nothing counted, or too little to gain: the experts stay
            continue
        new_map = ExpertMap(tuple(new.physical_to_logical[layer].tolist()), old.num_ranks)
        moved += move_expert_weights(moe.experts, dispatcher.expert_map, new_map, group, ep_rank)
        dispatcher.move_experts(new_map)
    return Rebalancing(before.tolist(), after.tolist(), moved)


def transfers(old: ExpertMap, new: ExpertMap) -> list[list[tuple[int, int]]]:
    """For each receiving rank, the (expert, sending rank) pairs it gains, in its new slot order; the sender is
    the lowest rank that held the expert."""
    holder = [slots[0] // old.slots_per_rank for slots in old.replicas()]
    gains = []
    for rank in range(new.num_ranks):
        held = set(old.local_experts(rank))
        gains.append([(e, holder[e]) for e in new.local_experts(rank) if e not in held])
    return gains


def check_movable(experts, num_slots: int) -> None:
    """Every parameter must hold the slots first and be contiguous, so a move writes into its own storage."""
    for name, param in experts.named_parameters():
        if param.dim() == 0 or param.shape[0] != num_slots or not param.is_contiguous():
            raise ConfigError(f"the expert parameter {name} {tuple(param.shape)} cannot be rebalanced: it must be "
                              f"contiguous with its {num_slots} expert slots first; run without --eplb-interval")


def move_expert_weights(experts, old: ExpertMap, new: ExpertMap, group, ep_rank: int) -> int:
    """Every parameter of the experts module (slots first) rearranged to the new map's slots, in place."""
    gains = transfers(old, new)
    if not any(gains):
        return 0
    old_local, new_local = old.local_experts(ep_rank), new.local_experts(ep_rank)
    sends = [[e for e, sender in gains[rank] if sender == ep_rank] for rank in range(new.num_ranks)]
    receives = [[e for e, sender in gains[ep_rank] if sender == rank] for rank in range(new.num_ranks)]
    for param in experts.parameters():
        rows = param.data.view(len(old_local), -1).view(torch.uint8)  # bytes: any dtype, moved as it is
        send = [rows[old_local.index(e)] for rank_sends in sends for e in rank_sends]
        send_rows = torch.stack(send) if send else rows.new_empty(0, rows.shape[1])
        received = rows.new_empty(sum(len(r) for r in receives), rows.shape[1])
        dist.all_to_all_single(received, send_rows, [len(r) for r in receives], [len(s) for s in sends], group=group)
        arriving = dict(zip([e for rank_receives in receives for e in rank_receives], received))
        rearranged = torch.stack([arriving[e] if e in arriving else rows[old_local.index(e)] for e in new_local])
        rows.copy_(rearranged)
    return sum(len(g) for g in gains)


class ExpertBalancer:
    """Rebalances a model's expert-parallel layers every `interval` forwards, from the tokens counted since the
    previous rebalancing. The forwards are counted on every rank alike (lockstep ranks run them together)."""

    def __init__(self, model, group, ep_rank: int, interval: int, device, num_nodes: int = 1):
        self.layers = expert_parallel_layers(model)
        for moe in self.layers:
            check_movable(moe.experts, expert_dispatcher(moe).slots_per_rank)
        self.group, self.ep_rank, self.interval, self.device = group, ep_rank, interval, device
        moe = model.config.moe
        self.num_groups = moe.num_groups if moe is not None else 1
        self.num_nodes = num_nodes
        self.forwards = 0
        self.counted: torch.Tensor | None = None  # the counters at the previous rebalancing
        self.last: Rebalancing | None = None
        self.moved_experts = 0  # over every rebalancing so far

    def before_forward(self) -> None:
        self.forwards += 1
        if not self.layers or self.forwards % self.interval:
            return
        totals = torch.stack([moe.expert_tokens.to(self.device) for moe in self.layers])
        since = totals - self.counted if self.counted is not None else totals
        self.counted = totals.clone()
        self.last = rebalance(self.layers, since, self.group, self.ep_rank, self.num_groups, self.num_nodes)
        self.moved_experts += self.last.moved_experts
        logger.info("EPLB: %d experts moved; max/mean tokens per EP rank, worst layer %.3f -> %.3f",
                    self.last.moved_experts, max(self.last.before), max(self.last.after))
