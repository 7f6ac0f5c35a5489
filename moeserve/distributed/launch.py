"""Starting the ranks. On one machine `launch` spawns one process per rank itself (gloo on CPU, NCCL
with one GPU per rank on CUDA). Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT set, one or many nodes) each process joins from its environment instead.

A rank that fails takes the others down within a bounded time: spawned ranks are terminated by the
parent, which re-raises the failed rank's error; torchrun's agent stops its node's workers, and
ranks on other nodes leave their next collective when `timeout` expires. Nothing waits forever.
"""

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeserve.distributed.layout import ParallelGroups, ParallelLayout


@dataclass
class DistributedContext:
    groups: ParallelGroups
    control: object  # a gloo group for small Python objects (requests, outputs), also under NCCL

    @property
    def rank(self) -> int:
        return dist.get_rank()


def under_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def device_for_rank(device: str, local_rank: int) -> str:
    return f"cuda:{local_rank}" if device.startswith("cuda") else device


def init_distributed(layout: ParallelLayout, device: str, timeout_s: float, rank: int | None = None,
                     init_method: str = "env://") -> DistributedContext:
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank or 0)))
    kwargs = {} if rank is None else {"rank": rank, "world_size": layout.world_size}
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    return make_context(layout, "cuda" if cuda else "cpu", timeout_s)


def make_context(layout: ParallelLayout, device_type: str, timeout_s: float) -> DistributedContext:
    """The layout's groups and the control group, over an initialized default group (every rank calls it)."""
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return DistributedContext(ParallelGroups(layout, device_type), control)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, layout: ParallelLayout, device: str, timeout_s: float, port: int, fn: Callable, args: tuple):
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(max(1, torch.get_num_threads() // layout.world_size))
    context = init_distributed(layout, device, timeout_s, rank, f"tcp://127.0.0.1:{port}")
    try:
        fn(context, *args)
    finally:
        dist.destroy_process_group()


def launch(layout: ParallelLayout, device: str, timeout_s: float, fn: Callable, *args) -> None:
    """fn(context, *args) on every rank of the layout (fn must be importable: a module-level function)."""
    if under_torchrun():
        if int(os.environ["WORLD_SIZE"]) != layout.world_size:
            raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} ranks but the layout needs "
                             f"{layout.world_size} (tp={layout.tp} x dp={layout.dp})")
        device = device_for_rank(device, int(os.environ.get("LOCAL_RANK", 0)))
        context = init_distributed(layout, device, timeout_s)
        try:
            fn(context, *args)
        finally:
            dist.destroy_process_group()
        return
    mp.spawn(_spawned, args=(layout, device, timeout_s, _free_port(), fn, args), nprocs=layout.world_size, join=True)
