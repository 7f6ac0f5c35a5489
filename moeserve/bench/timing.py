"""Timing on the GPU: CUDA events around calls or CUDA-graph replays."""

import statistics

import torch


def time_ms(fn, iterations: int = 20, warmup: int = 5) -> float:
    """Median of `iterations` timed calls (CUDA events), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_of(fn):
    """fn captured as a CUDA graph (replayed by the returned function), or None if it cannot be captured."""
    fn()  # compiles and allocates outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    return graph.replay


def per_copy_ms(fn_of_copy, copies: int) -> float:
    """The time of fn_of_copy(i), a call on copy i of its operands, as CUDA-graph replays of all copies in
    turn: with enough copies no operand stays in L2, as in a model's step that reads each weight once."""
    for i in range(copies):
        fn_of_copy(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn_of_copy(i)
    return time_ms(graph.replay, iterations=10, warmup=2) / copies
