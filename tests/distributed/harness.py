"""Run a function on N gloo ranks (spawned processes) and collect what each returns."""

import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeserve.distributed.launch import free_port


def _worker(rank, world, port, fn, args, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        result = fn(rank, world, *args)
    except BaseException:
        dist.destroy_process_group()
        raise
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))  # before the teardown (see run_ranks)
    dist.destroy_process_group()


def run_ranks(world: int, fn, *args) -> list:
    """fn(rank, world, *args) on `world` ranks; fn must be a module-level function. A rank killed by a signal after
    it saved its result (gloo's teardown after a rank-failure test has aborted now and then, under load) does not
    fail the run; one that raised, or died before its result, does."""
    out_dir = tempfile.mkdtemp(prefix="moeserve-ranks-")
    try:
        mp.spawn(_worker, args=(world, free_port(), fn, args, out_dir), nprocs=world, join=True)
    except mp.ProcessExitedException:
        if not all(os.path.exists(os.path.join(out_dir, f"{rank}.pt")) for rank in range(world)):
            raise
    # weights_only=False: the ranks may return objects (RequestOutputs), and these files are their own
    return [torch.load(os.path.join(out_dir, f"{rank}.pt"), weights_only=False) for rank in range(world)]
