"""Expert placement for expert-parallel load balancing (EPLB).

From the tokens each logical expert received in each MoE layer, choose what num_physical expert
slots hold, split evenly over num_ranks ranks: busy experts get extra replicas, and the replicas
are spread so that every rank computes about the same number of tokens. The tokens of an expert
with several replicas are assumed to split evenly over them.

The two modes follow DeepSeek's published EPLB design:
- hierarchical (num_nodes > 1 and num_nodes divides num_groups): whole expert groups are packed
  onto nodes first, so group-limited routing keeps a token's experts on few nodes; each node then
  replicates its own experts into its share of the slots and packs them onto its ranks.
- global (otherwise): all experts are replicated together and packed onto all ranks.

Both steps are greedy. Replication: one more replica for the expert with the most tokens per
replica, until the slots are used; an expert gets no more replicas than there are ranks to spread
them over (two on one rank would not spread its tokens), unless the slots need it. Packing: the
heaviest replica first, onto the lightest rank that has a free slot and does not hold that expert.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Placement:
    """The logical expert in each physical slot, per layer. Rank r holds the slots
    r * slots_per_rank() .. (r + 1) * slots_per_rank() - 1."""

    physical_to_logical: torch.Tensor  # [layers, num_physical] long
    replica_count: torch.Tensor  # [layers, num_logical] long, >= 1
    num_ranks: int

    def __post_init__(self):
        physical, count = self.physical_to_logical, self.replica_count
        if physical.dim() != 2 or count.dim() != 2 or physical.shape[0] != count.shape[0]:
            raise ValueError(f"physical_to_logical {tuple(physical.shape)} and replica_count {tuple(count.shape)} "
                             f"must be [layers, num_physical] and [layers, num_logical]")
        if not isinstance(self.num_ranks, int) or self.num_ranks < 1 or physical.shape[1] % self.num_ranks:
            raise ValueError(f"{physical.shape[1]} physical slots cannot be split evenly over "
                             f"num_ranks={self.num_ranks!r}")
        if physical.numel() and (physical.min() < 0 or physical.max() >= count.shape[1]):
            raise ValueError(f"physical_to_logical must hold logical ids in 0..{count.shape[1] - 1}")
        if (count < 1).any() or not torch.equal(_count_replicas(physical, count.shape[1]), count):
            raise ValueError("replica_count must be >= 1 and count the slots of each logical expert "
                             "in physical_to_logical")

    def slots_per_rank(self) -> int:
        return self.physical_to_logical.shape[1] // self.num_ranks

    def logical_to_physical(self) -> torch.Tensor:
        """[layers, num_logical, max_replicas]: the slots of each logical expert in increasing order, -1 padded."""
        physical, count = self.physical_to_logical, self.replica_count
        layers, num_physical = physical.shape
        slots = torch.argsort(physical, dim=1, stable=True)
        experts = physical.gather(1, slots)
        first = count.cumsum(1) - count
        nth = torch.arange(num_physical) - first.gather(1, experts)
        table = torch.full((layers, count.shape[1], int(count.max())), -1, dtype=torch.long)
        table[torch.arange(layers)[:, None], experts, nth] = slots
        return table


def balance(load: torch.Tensor, num_physical: int, num_ranks: int, num_groups: int = 1,
            num_nodes: int = 1) -> Placement:
    """load: [layers, num_logical] (or [num_logical]) tokens per logical expert (float or int, >= 0).

    The experts are num_groups equal groups of consecutive ids, and the ranks num_nodes equal nodes
    of consecutive ranks. Hierarchical mode when num_nodes > 1 divides num_groups, else global mode
    (see the module docstring).

    Guarantees:
    - every logical expert has at least one slot; every rank holds slots_per_rank slots, its
      experts in increasing logical id;
    - in hierarchical mode each node holds num_groups // num_nodes whole groups: every replica of
      their experts, and nothing else;
    - no rank holds two replicas of one expert, and no expert has more replicas than there are ranks
      to spread them over (all ranks in global mode, its node's in hierarchical mode), unless
      slots_per_rank exceeds the experts there (num_logical, or num_logical // num_nodes): then
      duplicates cannot be avoided, and each replica goes to a rank with the fewest of its expert;
    - the same input gives the same placement (ties go to the lower index).
    """
    load = _check_load(load)
    layers, num_logical = load.shape
    _check_sizes(num_logical, num_physical, num_ranks, num_groups, num_nodes)
    nodes = num_nodes if num_nodes > 1 and num_groups % num_nodes == 0 else 1
    ranks_per_node = num_ranks // nodes
    node_experts = _experts_by_node(load, num_groups, nodes)
    node_load = load.gather(1, node_experts.flatten(1)).view(layers * nodes, -1)
    count = _replicate(node_load, num_physical // nodes, ranks_per_node)
    taken = _pack(node_load / count, count, ranks_per_node, num_physical // num_ranks)
    experts = node_experts.view(layers * nodes, 1, -1).expand(-1, ranks_per_node, -1)
    physical = experts.flatten().repeat_interleave(taken.transpose(1, 2).flatten()).view(layers, num_physical)
    return Placement(physical, _count_replicas(physical, num_logical), num_ranks)


def rank_load(load: torch.Tensor, placement: Placement) -> torch.Tensor:
    """[layers, num_ranks] float64: tokens each rank computes when every logical expert's tokens are
    split evenly over its replicas."""
    load = _check_load(load)
    physical, count = placement.physical_to_logical, placement.replica_count
    if load.shape != count.shape:
        raise ValueError(f"load has shape {tuple(load.shape)}, but the placement is for "
                         f"[layers, num_logical] = {list(count.shape)}")
    per_slot = load.gather(1, physical) / count.gather(1, physical)
    return per_slot.view(load.shape[0], placement.num_ranks, -1).sum(-1)


def imbalance(rank_loads: torch.Tensor) -> torch.Tensor:
    """[layers]: max over mean of the per-rank load (1.0 = perfect; define 0-load layers as 1.0)."""
    rank_loads = torch.as_tensor(rank_loads, dtype=torch.float64)
    rank_loads = rank_loads[None] if rank_loads.dim() == 1 else rank_loads
    mean = rank_loads.mean(-1)
    return torch.where(mean > 0, rank_loads.amax(-1) / mean, 1.0)


def contiguous_placement(num_logical: int, num_ranks: int, layers: int = 1) -> Placement:
    """No redundancy: expert e on rank e // (num_logical // num_ranks) (the layout without a balancer)."""
    if num_ranks < 1 or layers < 1 or num_logical < num_ranks or num_logical % num_ranks:
        raise ValueError(f"contiguous_placement needs layers >= 1 and num_logical a positive multiple of "
                         f"num_ranks, got num_logical={num_logical}, num_ranks={num_ranks}, layers={layers}")
    physical = torch.arange(num_logical).expand(layers, num_logical).contiguous()
    return Placement(physical, torch.ones(layers, num_logical, dtype=torch.long), num_ranks)


def _check_load(load) -> torch.Tensor:
    load = torch.as_tensor(load)
    load = load[None] if load.dim() == 1 else load
    if load.dim() != 2 or 0 in load.shape:
        raise ValueError(f"load must be [layers, num_logical] or [num_logical] with at least one layer and one "
                         f"expert, got shape {tuple(load.shape)}")
    load = load.to(torch.float64)
    if load.isnan().any():
        raise ValueError("load contains NaN; give each expert's token count (a number >= 0)")
    if (load < 0).any():
        raise ValueError(f"load contains negative values (min {load.min().item()}); token counts must be >= 0")
    if load.isinf().any():
        raise ValueError("load contains inf; token counts must be finite")
    return load


def _check_sizes(num_logical: int, num_physical: int, num_ranks: int, num_groups: int, num_nodes: int) -> None:
    for name, value in (("num_physical", num_physical), ("num_ranks", num_ranks), ("num_groups", num_groups),
                        ("num_nodes", num_nodes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_physical < num_logical:
        raise ValueError(f"num_physical={num_physical} is less than num_logical={num_logical}: every logical expert "
                         f"needs a slot; use num_physical >= {num_logical}")
    if num_physical < num_ranks:
        raise ValueError(f"num_physical={num_physical} cannot give each of num_ranks={num_ranks} ranks a slot; "
                         f"use num_physical >= num_ranks")
    if num_physical % num_ranks:
        raise ValueError(f"num_physical={num_physical} is not a multiple of num_ranks={num_ranks}: each rank holds "
                         f"the same number of slots; round num_physical to a multiple of {num_ranks}")
    if num_ranks % num_nodes:
        raise ValueError(f"num_ranks={num_ranks} is not a multiple of num_nodes={num_nodes}: each node holds the "
                         f"same number of ranks")
    if num_logical % num_groups:
        raise ValueError(f"num_logical={num_logical} is not a multiple of num_groups={num_groups}: expert groups "
                         f"must be of equal size; use a num_groups that divides {num_logical}")


def _count_replicas(physical: torch.Tensor, num_logical: int) -> torch.Tensor:
    return torch.zeros(physical.shape[0], num_logical, dtype=torch.long).scatter_add_(1, physical,
                                                                                     torch.ones_like(physical))


def _experts_by_node(load: torch.Tensor, num_groups: int, nodes: int) -> torch.Tensor:
    """[layers, nodes, num_logical // nodes]: the experts of each node in increasing id, after packing
    the groups onto the nodes by their total load."""
    layers, num_logical = load.shape
    group_load = load.view(layers, num_groups, -1).sum(-1)
    ones = torch.ones(layers, num_groups, dtype=torch.long)
    node_of_group = _pack(group_load, ones, nodes, num_groups // nodes).argmax(-1)
    node_of_expert = node_of_group.repeat_interleave(num_logical // num_groups, dim=1)
    order = torch.argsort(node_of_expert * num_logical + torch.arange(num_logical), dim=1)
    return order.view(layers, nodes, -1)


def _replicate(load: torch.Tensor, slots: int, num_bins: int) -> torch.Tensor:
    """[B, n] replicas per expert, summing to slots: each extra replica goes to the expert with the
    most load per replica that has fewer than num_bins replicas (no cap when the slots need more)."""
    count = torch.ones_like(load, dtype=torch.long)
    cap = num_bins if slots <= load.shape[1] * num_bins else slots
    rows = torch.arange(load.shape[0])
    for _ in range(slots - load.shape[1]):
        per_replica = torch.where(count < cap, load / count, -1.0)
        count[rows, per_replica.argmax(1)] += 1
    return count


def _pack(weight: torch.Tensor, count: torch.Tensor, num_bins: int, per_bin: int) -> torch.Tensor:
    """[B, n, num_bins]: how many of the count[b, e] replicas (of weight[b, e] each) of expert e go to
    each bin, so that every bin gets per_bin replicas. Experts go heaviest first, each replica onto
    the lightest bin with room that holds the fewest replicas of that expert.

    Where no expert has more replicas than there are bins, no bin gets one expert twice: before
    taking the lightest bins, check (Gale-Ryser) that the experts still to come can each be spread
    over distinct bins; if not, take the bins with the most room, which keeps that possible."""
    batch, n = weight.shape
    rows = torch.arange(batch)
    order = torch.argsort(weight, dim=1, descending=True, stable=True)
    needs = _needs(count.gather(1, order), num_bins)
    distinct = count.amax(1) <= num_bins
    load = torch.zeros(batch, num_bins, dtype=weight.dtype)
    room = torch.full((batch, num_bins), per_bin)
    taken = []
    for j in range(n):
        expert = order[:, j]
        replicas, each = count[rows, expert], weight[rows, expert]
        take = _lightest(load, room, replicas, each)
        stuck = distinct & ~_fits(room - take, needs[:, j + 1])
        if stuck.any():
            take[stuck] = _roomiest(load[stuck], room[stuck], replicas[stuck])
        taken.append(take)
        load += take * each[:, None]
        room -= take
    by_expert = torch.argsort(order, dim=1)
    return torch.stack(taken, 1).gather(1, by_expert[:, :, None].expand(-1, -1, num_bins))


def _needs(sorted_count: torch.Tensor, num_bins: int) -> torch.Tensor:
    """[B, n + 1, num_bins]: [b, j, k - 1] = the sum over the experts j.. of min(replicas, k)."""
    capped = torch.minimum(sorted_count[:, :, None], torch.arange(1, num_bins + 1))
    suffix = capped.flip(1).cumsum(1).flip(1)
    return torch.cat([suffix, torch.zeros_like(suffix[:, :1])], dim=1)


def _fits(room: torch.Tensor, needs: torch.Tensor) -> torch.Tensor:
    """[B]: whether experts, each on distinct bins, can fill bins of this room exactly (Gale-Ryser:
    the k roomiest bins never have more room than the experts' sum of min(replicas, k))."""
    return (room.sort(1, descending=True).values.cumsum(1) <= needs).all(1)


def _lightest(load: torch.Tensor, room: torch.Tensor, replicas: torch.Tensor, each: torch.Tensor) -> torch.Tensor:
    """[B, num_bins]: the replicas placed one by one, each onto the bin with room that holds the
    fewest of them so far, the lightest among those."""
    rows = torch.arange(load.shape[0])
    load = load.clone()
    take = torch.zeros_like(room)
    for nth in range(int(replicas.max())):
        free = take < room
        fewest = torch.where(free, take, room.max() + 1).amin(1, keepdim=True)
        pick = torch.where(free & (take == fewest), load, torch.inf).argmin(1)
        active = rows[nth < replicas]
        take[active, pick[active]] += 1
        load[active, pick[active]] += each[active]
    return take


def _roomiest(load: torch.Tensor, room: torch.Tensor, replicas: torch.Tensor) -> torch.Tensor:
    """[B, num_bins]: one replica on each of the bins with the most room, the lighter first among equals."""
    by_load = torch.argsort(load, dim=1, stable=True)
    by_room = by_load.gather(1, torch.argsort(room.gather(1, by_load), dim=1, descending=True, stable=True))
    chosen = (torch.arange(room.shape[1]) < replicas[:, None]).long()
    return torch.zeros_like(room).scatter_(1, by_room, chosen)
