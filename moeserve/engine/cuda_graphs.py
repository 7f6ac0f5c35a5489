"""CUDA graphs of the decode step: the whole forward, embedding to logits, captured at start-up once per
batch size into one shared memory pool, and replayed for decode-only steps padded to the next captured
size. The graphs read their inputs from the runner's persistent device buffers and the block table."""

import bisect
import logging
import time
from typing import Callable

import torch

from moeserve.engine.args import EngineArgs

logger = logging.getLogger(__name__)


def graph_sizes(args: EngineArgs) -> list[int]:
    """The batch sizes to capture: args.cuda_graph_sizes, or 1, 2, 4, 8 and then steps of 8 up to the
    largest decode batch (max_num_seqs, and no more than max_num_batched_tokens)."""
    largest = min(args.max_num_seqs, args.max_num_batched_tokens)
    if args.cuda_graph_sizes:
        return sorted(set(args.cuda_graph_sizes))
    sizes = {size for size in (1, 2, 4) if size < largest} | set(range(8, largest + 1, 8)) | {largest}
    return sorted(sizes)


class DecodeGraphs:
    def __init__(self, sizes: list[int]):
        self.sizes = sorted(sizes)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # size -> (graph, its logits)
        self.replays = 0

    def capture(self, forward: Callable[[int], torch.Tensor], send_padding: Callable[[int], None],
                device: torch.device) -> None:
        """forward(size) runs the step over the device inputs of `size` rows; send_padding(size) fills them
        with padding rows. Largest first, so the pool is sized by it and the others reuse it."""
        start, free_before = time.perf_counter(), torch.cuda.mem_get_info(device)[0]
        pool = None
        for size in reversed(self.sizes):
            send_padding(size)
            forward(size)  # compiles this size's kernels and makes any lazily allocated state outside the graph
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = forward(size)
            pool = graph.pool()
            self.graphs[size] = (graph, logits)
        torch.cuda.synchronize(device)
        used = free_before - torch.cuda.mem_get_info(device)[0]
        logger.info("Captured %d decode CUDA graphs (batch sizes %s) in %.1f s, %.2f GiB",
                    len(self.sizes), describe_sizes(self.sizes), time.perf_counter() - start, used / 2**30)

    def size_for(self, batch: int) -> int | None:
        """The smallest captured size that holds the batch (None: larger than every graph)."""
        index = bisect.bisect_left(self.sizes, batch)
        return self.sizes[index] if index < len(self.sizes) else None

    def replay(self, size: int) -> torch.Tensor:
        graph, logits = self.graphs[size]
        graph.replay()
        self.replays += 1
        return logits


def describe_sizes(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) if len(sizes) <= 8 else f"{', '.join(map(str, sizes[:5]))}, ..., {sizes[-1]}"
