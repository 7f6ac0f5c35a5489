"""`moeserve bench ep --virtual-ranks R`: the peer-to-peer transport with R EP ranks in one process on one device
(moeserve.distributed.ep.peer_to_peer.VirtualRanks): what the kernels cost without the fabric. Per point: dispatch and
combine of every rank (all R in turn, as one device runs them), the bytes they move (rows put and results read back:
all, between ranks, and what sending per expert would move), and a device-to-device copy of the moved bytes timed in
the same run, the yardstick (issue 15's one-GPU target: within 1.5x of it). The experts return their input, written
into each rank's results area as the engine's experts write it (not timed). Wall times of eager calls:
high-throughput dispatch includes each rank's host sync for its received count. Low-latency mode, which never waits on
the host, is also timed as CUDA-graph replays (how a decode step runs it): the kernels alone."""

import statistics
import time
from dataclasses import dataclass

import torch

from moeserve.bench import ep
from moeserve.bench.timing import graph_of, time_ms
from moeserve.distributed.ep.peer_to_peer import VirtualRanks
from moeserve.distributed.layout import ExpertMap


@dataclass
class VirtualEpPoint:
    dispatch_us: float  # all ranks' dispatch, one after another
    combine_us: float
    moved_bytes: int  # rows put into receive areas and results read back, between ranks and within one
    wire_bytes: int  # of those, what crosses between ranks (what a fabric would carry)
    logical_bytes: int  # tokens x top-k payloads and results: what sending per expert instead of per rank would move
    copy_us: float  # a device-to-device copy of moved_bytes
    graph_dispatch_us: float | None = None  # low latency on CUDA: CUDA-graph replays
    graph_combine_us: float | None = None


def median_us(fn, device: torch.device, iterations: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(iterations):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def routes(ranks: int, tokens: int, experts: int, top_k: int, skewed: bool, generator, device):
    """Top-k expert ids per rank: uniform, or skewed (every token prefers rank 0's experts: they score +0.5)."""
    scores = [torch.rand(tokens, experts, device=device, generator=generator) for _ in range(ranks)]
    if skewed:
        hot = (torch.arange(experts, device=device) < experts // ranks).float() * 0.5
        scores = [s + hot for s in scores]
    return [s.topk(top_k, dim=1).indices for s in scores]


def measure_virtual(ranks: int, tokens: int, hidden: int, top_k: int, experts: int, fmt: str, device,
                    iterations: int = 20, low_latency: bool = False, skewed: bool = False) -> VirtualEpPoint:
    device = torch.device(device)
    expert_map = ExpertMap.contiguous(experts, ranks)
    group = VirtualRanks(expert_map, fmt, hidden, top_k, tokens, device, low_latency=low_latency)
    generator = torch.Generator(device=device).manual_seed(ranks)
    xs = [torch.randn(tokens, hidden, device=device, generator=generator).bfloat16() for _ in range(ranks)]
    ids = routes(ranks, tokens, experts, top_k, skewed, generator, device)
    weights = [torch.rand(tokens, top_k, device=device, generator=generator) for _ in range(ranks)]
    received = group.dispatch(xs, ids, weights)
    ys = experts_output(group, received)
    handles = [handle for _, _, handle in received]
    dispatch_us = median_us(lambda: group.dispatch(xs, ids, weights), device, iterations)
    combine_us = median_us(lambda: group.combine(ys, handles), device, iterations)
    payload = group.ranks[0].format.payload_bytes(hidden)
    row_bytes, result_bytes = payload + 8 * top_k, hidden * 2  # what a put writes (not the rows' padding)
    sent = [handle.local_index >= 0 for handle in handles]  # each row sent, and its result read back
    rows = sum(int(s.sum()) for s in sent)
    from_others = rows - sum(int(s[:, rank].sum()) for rank, s in enumerate(sent))
    source = torch.empty(rows * (row_bytes + result_bytes), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_us = median_us(lambda: target.copy_(source), device, iterations)
    graphs = graph_times(group, xs, ids, weights, iterations) if low_latency and device.type == "cuda" else (None, None)
    return VirtualEpPoint(dispatch_us, combine_us, rows * (row_bytes + result_bytes),
                          from_others * (row_bytes + result_bytes), ranks * tokens * top_k * (payload + result_bytes),
                          copy_us, *graphs)


def experts_output(group: VirtualRanks, received) -> list[torch.Tensor]:
    """Each rank's experts_output (moeserve.bench.ep): in its results area."""
    return [ep.experts_output(rank, r) for rank, r in zip(group.ranks, received)]


def graph_times(group: VirtualRanks, xs, ids, weights, iterations: int) -> tuple[float, float]:
    """(dispatch us, combine us) of every rank, each captured as one CUDA graph and timed by replays."""
    state = {}
    dispatch = graph_of(lambda: state.update(received=group.dispatch(xs, ids, weights)))
    if dispatch is None:
        raise RuntimeError("the low-latency dispatch could not be captured in a CUDA graph")
    dispatch()  # the captured outputs hold nothing until a replay
    torch.cuda.synchronize()
    ys = experts_output(group, state["received"])
    handles = [handle for _, _, handle in state["received"]]
    combine = graph_of(lambda: group.combine(ys, handles))
    if combine is None:
        raise RuntimeError("the low-latency combine could not be captured in a CUDA graph")
    return time_ms(dispatch, iterations) * 1e3, time_ms(combine, iterations) * 1e3


HEADER = ("| virtual ranks | tokens/rank | format | mode | routing | dispatch us | combine us | graph dispatch us | graph "
          "combine us | MB moved | MB between ranks | MB per expert | copy of the moved bytes us | ours / copy | "
          "graphs / copy |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def report_row(ranks: int, tokens: int, fmt: str, mode: str, routing: str, point: VirtualEpPoint) -> str:
    total = point.dispatch_us + point.combine_us
    copy = max(point.copy_us, 1e-9)
    graphed = point.graph_dispatch_us is not None
    graph_cells = (f"{point.graph_dispatch_us:.0f} | {point.graph_combine_us:.0f}" if graphed else "- | -")
    graph_ratio = f"{(point.graph_dispatch_us + point.graph_combine_us) / copy:.2f}" if graphed else "-"
    return (f"| {ranks} | {tokens} | {fmt} | {mode} | {routing} | {point.dispatch_us:.0f} | {point.combine_us:.0f} | "
            f"{graph_cells} | {point.moved_bytes / 1e6:.3f} | {point.wire_bytes / 1e6:.3f} | "
            f"{point.logical_bytes / 1e6:.3f} | {point.copy_us:.0f} | {total / copy:.2f} | {graph_ratio} |")
