"""Functions the launch tests run on every rank (importable by spawned and torchrun processes)."""

import sys

import torch
import torch.distributed as dist

from moeserve.distributed.launch import launch
from moeserve.distributed.layout import ParallelLayout


def fail_on_last_rank(context) -> None:
    if context.rank == dist.get_world_size() - 1:
        raise RuntimeError(f"rank {context.rank} failed on purpose")
    dist.all_reduce(torch.ones(1))  # the others wait here for the rank that never comes


if __name__ == "__main__":  # under torchrun: python -m torch.distributed.run ... tests/distributed/rank_scripts.py TIMEOUT
    launch(ParallelLayout(dp=4, ep=4), "cpu", float(sys.argv[1]), fail_on_last_rank)
