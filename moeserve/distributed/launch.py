"""Starting the ranks. On one machine `launch` spawns one process per rank itself (gloo on CPU, NCCL
with one GPU per rank on CUDA). Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT set, one or many nodes) each process joins from its environment instead.

A rank that fails takes the others down within a bounded time: spawned ranks are terminated by the
parent, which re-raises the failed rank's error; torchrun's agent stops its node's workers, and
ranks on other nodes leave their next collective when `timeout` expires. Nothing waits forever.

Stopping: SIGINT or SIGTERM to the launching process goes on to rank 0 as SIGTERM (a server there
shuts down gracefully and tells the other ranks to stop); the other ranks ignore SIGINT, which a
terminal sends to every process, so it cannot break them out of a collective.
"""

import os
import pickle
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from moeserve.distributed.layout import ParallelGroups, ParallelLayout


class RankFailure(RuntimeError):
    """A spawned rank failed; the message starts with the rank that failed first (the cause: the others
    usually fail after it, their collectives cut off)."""


@dataclass
class DistributedContext:
    groups: ParallelGroups
    control: object  # a gloo group for small Python objects (requests, outputs), also under NCCL

    @property
    def rank(self) -> int:
        return dist.get_rank()


def under_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; any other device as given."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, layout: ParallelLayout, device: str, timeout_s: float, port: int, fn: Callable, args: tuple):
    if rank != 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
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
    ranks = mp.start_processes(_spawned, args=(layout, device, timeout_s, free_port(), fn, args),
                               nprocs=layout.world_size, join=False, start_method="spawn")

    def stop_rank_0(signum, frame):
        if ranks.processes[0].is_alive():
            os.kill(ranks.processes[0].pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop_rank_0) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not ranks.join():  # raises if a rank fails, after stopping the others
            pass
    except ProcessException as error:
        raise RankFailure(failures_in_order(ranks.error_files) or str(error)) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def failures_in_order(error_files: list[str]) -> str:
    """The tracebacks the failed ranks left (torch.multiprocessing writes them), earliest first."""
    written = [(os.path.getmtime(path), rank, path) for rank, path in enumerate(error_files)
               if os.path.exists(path) and os.path.getsize(path) > 0]
    parts = []
    for _, rank, path in sorted(written):
        with open(path, "rb") as f:
            parts.append(f"rank {rank} failed:\n{pickle.load(f)}")  # a traceback string this launcher's ranks wrote
    return "\n".join(parts)
