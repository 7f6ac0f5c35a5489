"""The parallel layout: how many ranks split attention (tp), hold separate requests (dp), and share
the experts (ep); the process groups it needs; and which rank holds which expert.

Ranks are numbered rank = dp_index * tp + tp_index. Attention: a TP group is tp consecutive ranks.
MoE: an EP group is ep consecutive ranks; with ep < tp * dp there are several EP groups, each
holding all experts. With ep = 1 and tp > 1 the experts are split along their intermediate size.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeserve.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    dp: int = 1
    ep: int = 1

    def __post_init__(self):
        for name in ("tp", "dp", "ep"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"ParallelLayout.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.world_size % self.ep:
            raise ConfigError(f"ep={self.ep} must divide tp * dp = {self.world_size}")

    @property
    def world_size(self) -> int:
        return self.tp * self.dp

    def check_model(self, config: ModelConfig) -> None:
        experts = config.moe.num_experts
        if experts % self.ep:
            raise ConfigError(f"{experts} experts cannot be split evenly over ep={self.ep} ranks; "
                              f"choose an ep that divides {experts}")
        if config.num_heads % self.tp:
            raise ConfigError(f"{config.num_heads} attention heads cannot be split over tp={self.tp}")
        if config.mla is None and config.num_kv_heads % self.tp:
            raise ConfigError(f"{config.num_kv_heads} KV heads cannot be split over tp={self.tp}; use a tp that "
                              f"divides {config.num_kv_heads}")
        if self.ep == 1 and self.tp > 1 and config.moe.intermediate_size % self.tp:
            raise ConfigError(f"expert intermediate size {config.moe.intermediate_size} cannot be split over tp={self.tp}")

    def dp_index(self, rank: int) -> int:
        return rank // self.tp

    def tp_index(self, rank: int) -> int:
        return rank % self.tp

    def ep_index(self, rank: int) -> int:
        return rank % self.ep


@dataclass(frozen=True)
class ExpertMap:
    """Physical expert slots -> the logical expert each holds; EP rank r holds slots r * slots_per_rank onwards.
    A logical expert may have several replicas (redundant experts), never two on one rank. Dispatchers and
    loaders read only this map, so a load balancer moves experts by changing it."""

    logical_of_slot: tuple[int, ...]
    num_ranks: int

    def __post_init__(self):
        if len(self.logical_of_slot) % self.num_ranks:
            raise ConfigError(f"{len(self.logical_of_slot)} expert slots cannot be split evenly over {self.num_ranks} "
                              "EP ranks: use a number of redundant experts that makes them a multiple")
        for rank in range(self.num_ranks):
            local = self.local_experts(rank)
            if len(set(local)) != len(local):
                raise ConfigError(f"EP rank {rank} would hold two replicas of one expert ({local}): use fewer "
                                  "redundant experts (at most num_experts x (ranks - 1))")

    @classmethod
    def contiguous(cls, num_experts: int, ep: int) -> "ExpertMap":
        return cls(tuple(range(num_experts)), ep)

    @property
    def num_experts(self) -> int:
        return max(self.logical_of_slot) + 1

    @property
    def slots_per_rank(self) -> int:
        return len(self.logical_of_slot) // self.num_ranks

    def local_experts(self, ep_rank: int) -> list[int]:
        """Logical ids of the experts at ep_rank, in slot order."""
        per_rank = len(self.logical_of_slot) // self.num_ranks
        return list(self.logical_of_slot[ep_rank * per_rank : (ep_rank + 1) * per_rank])

    def replicas(self) -> list[list[int]]:
        """Each logical expert's physical slots, in increasing order."""
        slots: list[list[int]] = [[] for _ in range(self.num_experts)]
        for slot, expert in enumerate(self.logical_of_slot):
            slots[expert].append(slot)
        return slots

    def tensors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(replica slots [E, num_ranks], -1 padded; replica counts [E]): at most one replica per rank, so the
        table's width never changes when a balancer moves experts."""
        replicas = self.replicas()
        rows = [slots + [-1] * (self.num_ranks - len(slots)) for slots in replicas]
        return (torch.tensor(rows, dtype=torch.long, device=device),
                torch.tensor([len(slots) for slots in replicas], dtype=torch.long, device=device))


class ParallelGroups:
    """The process groups of a layout, over an initialized default group: a named device mesh
    (dp, tp) for attention and one (ep_replica, ep) for the experts."""

    def __init__(self, layout: ParallelLayout, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        if dist.get_world_size() != layout.world_size:
            raise ConfigError(f"the layout needs {layout.world_size} ranks (tp={layout.tp} x dp={layout.dp}), "
                              f"but {dist.get_world_size()} were started")
        self.layout = layout
        self.rank = dist.get_rank()
        self.mesh = init_device_mesh(device_type, (layout.dp, layout.tp), mesh_dim_names=("dp", "tp"))
        self.expert_mesh = init_device_mesh(device_type, (layout.world_size // layout.ep, layout.ep),
                                            mesh_dim_names=("ep_replica", "ep"))
        self.tp_group = self.mesh.get_group("tp")
        self.dp_group = self.mesh.get_group("dp")
        self.ep_group = self.expert_mesh.get_group("ep")

    @property
    def tp_rank(self) -> int:
        return self.layout.tp_index(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_index(self.rank)

    @property
    def ep_rank(self) -> int:
        return self.layout.ep_index(self.rank)
