"""Do the p2p transport's puts overlap compute on one GPU? A DeepSeek-V3 shared expert over T tokens (bf16 GEMMs
7168 -> 2 x 2048 -> 7168, on the compute stream) beside R virtual ranks' puts of the same T tokens a rank (dispatch
rows and the combine's gets of results, on a side stream with an SM budget): each alone, then both at once, as CUDA
graph replays.
hidden = (gemm + puts - both) / puts: the share of the puts' time the overlap hides.
Usage: PYTHONPATH=. python3 scripts/probes/ep_overlap.py [R] [T] [fmt] [budgets, e.g. none,16,32,64]"""

import sys

import torch
import torch.nn.functional as F

from moeserve.bench.ep_virtual import routes
from moeserve.bench.timing import time_ms
from moeserve.distributed.ep.peer_to_peer import VirtualRanks
from moeserve.distributed.layout import ExpertMap
from moeserve.quant.fp8 import Fp8Activations

HIDDEN, TOP_K, EXPERTS, SHARED = 7168, 8, 256, 2048


def shared_expert(tokens: int, device):
    x = torch.randn(tokens, HIDDEN, device=device).bfloat16()
    gate_up = torch.randn(2 * SHARED, HIDDEN, device=device).bfloat16() / HIDDEN**0.5
    down = torch.randn(HIDDEN, SHARED, device=device).bfloat16() / SHARED**0.5

    def run():
        gate, up = F.linear(x, gate_up).chunk(2, dim=1)
        return F.linear(F.silu(gate) * up, down)
    return run


def puts(ranks: int, tokens: int, fmt: str, budget, device):
    group = VirtualRanks(ExpertMap.contiguous(EXPERTS, ranks), fmt, HIDDEN, TOP_K, tokens, device, comm_sms=budget)
    generator = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(tokens, HIDDEN, device=device, generator=generator).bfloat16() for _ in range(ranks)]
    ids = routes(ranks, tokens, EXPERTS, TOP_K, False, generator, device)
    weights = [torch.rand(tokens, TOP_K, device=device, generator=generator) for _ in range(ranks)]
    sendings = [rank.send_counts(x, i, w) for rank, x, i, w in zip(group.ranks, xs, ids, weights)]
    for rank, sending in zip(group.ranks, sendings):
        rank.send_rows(sending)
    received = [rank.receive(sending) for rank, sending in zip(group.ranks, sendings)]
    for rank, (t, _, handle) in zip(group.ranks, received):  # experts that return their input, into the results area
        rank.store_results(t.dequantize() if isinstance(t, Fp8Activations) else t, handle)

    def run():
        for rank, sending in zip(group.ranks, sendings):
            rank.send_rows(sending)
        for rank, (_, _, handle) in zip(group.ranks, received):
            rank.pull_results(handle)
    return run


def graphed(fn, device):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return lambda: time_ms(graph.replay, iterations=30, warmup=5)


def main():
    args = sys.argv[1:] + [None] * 4
    ranks, tokens, fmt = int(args[0] or 2), int(args[1] or 4096), args[2] or "bf16"
    budgets = [None if b == "none" else int(b) for b in (args[3] or "none,16,32,64").split(",")]
    device = torch.device("cuda")
    gemm = shared_expert(tokens, device)
    gemm_ms = graphed(gemm, device)()
    flops = 2 * tokens * HIDDEN * 3 * SHARED
    print(f"shared expert alone: {gemm_ms * 1e3:.0f} us ({flops / gemm_ms / 1e9:.0f} TFLOP/s)")
    print(f"{'SMs':>5} {'puts us':>8} {'both us':>8} {'sum us':>8} {'hidden':>7}")
    for budget in budgets:
        put = puts(ranks, tokens, fmt, budget, device)
        side = torch.cuda.Stream(device)

        def both():
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                put()
            gemm()
            torch.cuda.current_stream(device).wait_stream(side)

        puts_ms, both_ms = graphed(put, device)(), graphed(both, device)()
        hidden = (gemm_ms + puts_ms - both_ms) / puts_ms
        print(f"{budget or 'all':>5} {puts_ms * 1e3:8.0f} {both_ms * 1e3:8.0f} {(gemm_ms + puts_ms) * 1e3:8.0f} "
              f"{hidden:7.0%}")


if __name__ == "__main__":
    main()
