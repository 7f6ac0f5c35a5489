"""`moeserve bench ep --virtual-ranks R`: the peer-to-peer transport with R EP ranks in one process on one device
(moeserve.distributed.ep.peer_to_peer.VirtualRanks): what the kernels cost without the fabric. Per point: dispatch and
combine of every rank (all R in turn, as one device runs them), the bytes they write, and a device-to-device copy of
the same bytes timed in the same run, the yardstick (issue 15's one-GPU target: within 1.5x of it)."""

import statistics
import time
from dataclasses import dataclass

import torch

from moeserve.distributed.ep.peer_to_peer import VirtualRanks
from moeserve.distributed.layout import ExpertMap
from moeserve.quant.fp8 import Fp8Activations


@dataclass
class VirtualEpPoint:
    dispatch_us: float  # all ranks' dispatch, one after another
    combine_us: float
    dispatch_bytes: int  # rows written into receive areas (to other ranks and to itself)
    combine_bytes: int
    copy_us: float  # a device-to-device copy of dispatch_bytes + combine_bytes


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


def measure_virtual(ranks: int, tokens: int, hidden: int, top_k: int, experts: int, fmt: str, device,
                    iterations: int = 20) -> VirtualEpPoint:
    device = torch.device(device)
    expert_map = ExpertMap.contiguous(experts, ranks)
    group = VirtualRanks(expert_map, fmt, hidden, top_k, tokens, device)
    generator = torch.Generator(device=device).manual_seed(ranks)
    xs = [torch.randn(tokens, hidden, device=device, generator=generator).bfloat16() for _ in range(ranks)]
    ids = [torch.rand(tokens, experts, device=device, generator=generator).topk(top_k, dim=1).indices
           for _ in range(ranks)]
    weights = [torch.rand(tokens, top_k, device=device, generator=generator) for _ in range(ranks)]
    received = group.dispatch(xs, ids, weights)
    ys = [t.dequantize() if isinstance(t, Fp8Activations) else t for t, _, _ in received]  # experts return input
    handles = [handle for _, _, handle in received]
    dispatch_us = median_us(lambda: group.dispatch(xs, ids, weights), device, iterations)
    combine_us = median_us(lambda: group.combine(ys, handles), device, iterations)
    rows = sum(handle.source.numel() for handle in handles)
    dispatch_bytes = rows * group.ranks[0].row_bytes(hidden, top_k)
    combine_bytes = rows * hidden * 2
    source = torch.empty(dispatch_bytes + combine_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_us = median_us(lambda: target.copy_(source), device, iterations)
    return VirtualEpPoint(dispatch_us, combine_us, dispatch_bytes, combine_bytes, copy_us)


HEADER = ("| virtual ranks | tokens/rank | format | dispatch us | combine us | MB written | copy of the same bytes us | "
          "ours / copy |\n|---|---|---|---|---|---|---|---|")


def report_row(ranks: int, tokens: int, fmt: str, point: VirtualEpPoint) -> str:
    total = point.dispatch_us + point.combine_us
    megabytes = (point.dispatch_bytes + point.combine_bytes) / 1e6
    return (f"| {ranks} | {tokens} | {fmt} | {point.dispatch_us:.0f} | {point.combine_us:.0f} | {megabytes:.1f} | "
            f"{point.copy_us:.0f} | {total / point.copy_us:.2f} |")
