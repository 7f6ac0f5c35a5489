"""Expert-parallel dispatch and combine on their own: random tokens, uniform random top-k routing,
experts that return their input. Per point: median latency of dispatch and of combine (slowest rank),
the bytes each rank sends to other ranks per second, and NCCL's (or gloo's) all_to_all_single of the
same bytes per rank, timed in the same run, as the yardstick."""

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeserve.bench.timing import graph_of
from moeserve.distributed.ep.dispatchers import DISPATCHERS
from moeserve.distributed.ep.peer_to_peer import PeerToPeerRank, PeerTransport
from moeserve.distributed.layout import ExpertMap
from moeserve.quant.formats import dequantized_tokens


P2P_MODES = ("p2p", "p2p-ll")  # the peer-to-peer transport, high-throughput (eager) and low-latency (CUDA graphs)


@dataclass
class EpPoint:
    dispatch_us: float
    combine_us: float
    dispatch_bytes: int  # sent to other ranks by this rank
    combine_bytes: int
    yardstick_us: float  # all_to_all_single of dispatch_bytes + combine_bytes, evenly split


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_us(fn, device, iterations: int, group) -> float:
    times = []
    for _ in range(iterations):
        dist.barrier(group=group)
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e6)
    median = torch.tensor([statistics.median(times)])
    dist.all_reduce(median, op=dist.ReduceOp.MAX, group=group)  # the slowest rank sets the pace
    return median.item()


def measure_point(tokens: int, hidden: int, top_k: int, experts: int, fmt: str, backend: str, device,
                  group, control, iterations: int = 20, comm_sms: int | None = None) -> EpPoint:
    """comm_sms (p2p backends): the puts and gets on a stream of their own with at most that many programs."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    expert_map = ExpertMap.contiguous(experts, world)
    if backend in P2P_MODES:  # buffers in symmetric memory for this point's tokens (CUDA)
        low_latency = backend == "p2p-ll"
        transport = PeerTransport(group, world, max(tokens, 1),
                                  low_latency_tokens=max(tokens, 1) if low_latency else None, comm_sms=comm_sms)
        transport.low_latency = low_latency
        dispatcher = PeerToPeerRank(expert_map, rank, fmt, transport, device, torch.bfloat16)
    else:
        dispatcher = DISPATCHERS[backend](expert_map, group, rank, fmt, device, torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(tokens, hidden, device=device, generator=generator).to(torch.bfloat16)
    topk_ids = torch.rand(tokens, experts, device=device, generator=generator).topk(top_k, dim=1).indices
    topk_weights = torch.rand(tokens, top_k, device=device, generator=generator)
    state = {}

    def dispatch():
        state["out"] = dispatcher.dispatch(x, topk_ids, topk_weights)

    def combine():
        _, _, handle = state["out"]
        dispatcher.combine(state["experts_out"], handle)  # experts that return their input

    dispatch()  # the same routing every time: the received rows keep their number
    state["experts_out"] = experts_output(dispatcher, state["out"])
    for _ in range(3):
        dispatch(), combine()
    if backend == "p2p-ll":  # as decode steps run it: CUDA graphs (captured on every rank alike)
        dispatch, combine = graphed_exchange(dispatcher, dispatch, combine, state, device)
    dispatch_us = _median_us(dispatch, device, iterations, control)
    combine_us = _median_us(combine, device, iterations, control)
    dispatch_bytes, combine_bytes = sent_bytes(state["out"][2], dispatcher, hidden, top_k, rank, backend)
    yardstick_us = yardstick(dispatch_bytes + combine_bytes, world, device, group, control, iterations)
    return EpPoint(dispatch_us, combine_us, dispatch_bytes, combine_bytes, yardstick_us)


def experts_output(dispatcher, received) -> torch.Tensor:
    """Experts that return their input (quantized rows arrive as they travelled: the output is in the activation
    dtype), written where the dispatcher wants the experts' output (p2p: its results area, as the engine's experts write
    it)."""
    rows, _, handle = received
    rows = dequantized_tokens(rows)
    results = dispatcher.results_buffer(handle)
    return rows if results is None else results.copy_(rows)


def graphed_exchange(dispatcher, dispatch, combine, state: dict, device):
    """(dispatch, combine) as replays of CUDA graphs; the combine is captured over the replayed dispatch's outputs,
    the experts' output written where the dispatcher wants it."""
    dispatch_graph = graph_of(dispatch)
    if dispatch_graph is None:
        raise RuntimeError("the low-latency dispatch could not be captured in a CUDA graph")
    dispatch_graph()  # the captured outputs hold nothing until a replay
    _sync(device)
    state["experts_out"] = experts_output(dispatcher, state["out"])
    combine_graph = graph_of(combine)
    if combine_graph is None:
        raise RuntimeError("the low-latency combine could not be captured in a CUDA graph")
    return dispatch_graph, combine_graph


def sent_bytes(handle, dispatcher, hidden: int, top_k: int, rank: int, backend: str) -> tuple[int, int]:
    row_bytes = dispatcher.format.payload_bytes(hidden) + 8 * top_k
    if backend == "all_to_all":
        to_others = sum(c for r, c in enumerate(handle.send_counts) if r != rank)
        back_to_others = sum(c for r, c in enumerate(handle.recv_counts) if r != rank)
        return to_others * row_bytes, back_to_others * hidden * 2
    if backend in P2P_MODES:
        sent = handle.local_index >= 0  # each row sent to another rank, and its result read back from there
        to_others = int(sent.sum()) - int(sent[:, rank].sum())
        return to_others * row_bytes, to_others * hidden * 2
    others = dispatcher.ep - 1  # allgather: every padded row goes to every other rank, and comes back reduced
    return others * handle.padded_tokens * row_bytes, others * handle.padded_tokens * hidden * 2


def yardstick(total_bytes: int, world: int, device, group, control, iterations: int) -> float:
    """all_to_all_single moving the busiest rank's dispatch + combine bytes from every rank, evenly split."""
    busiest = torch.tensor([total_bytes])
    dist.all_reduce(busiest, op=dist.ReduceOp.MAX, group=control)
    per_peer = max(1, int(busiest) // max(world - 1, 1))
    send = torch.empty(per_peer * world, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    return _median_us(lambda: dist.all_to_all_single(recv, send, group=group), device, iterations, control)


def report_row(tokens, fmt, backend, point: EpPoint) -> str:
    def rate(nbytes, us):
        return nbytes / us / 1e3  # GB/s

    total_us = point.dispatch_us + point.combine_us
    return (f"| {tokens} | {fmt} | {backend} | {point.dispatch_us:.0f} | {point.combine_us:.0f} | "
            f"{rate(point.dispatch_bytes, point.dispatch_us):.2f} | {rate(point.combine_bytes, point.combine_us):.2f} | "
            f"{point.yardstick_us:.0f} | {point.yardstick_us / total_us:.2f} |")


HEADER = ("| tokens/rank | format | backend | dispatch us | combine us | dispatch GB/s/rank | combine GB/s/rank | "
          "a2a same bytes us | a2a time / ours |\n|---|---|---|---|---|---|---|---|---|")
