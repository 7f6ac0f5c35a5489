"""Where the peer-to-peer transport's time goes on one GPU: dispatch + combine of R virtual ranks (DeepSeek-V3
shape) under torch.profiler, per point the wall time, GPU-busy share, kernels per exchange and the top kernels.
Usage: PYTHONPATH=. python3 scripts/probes/ep_profile.py [R,...] [tokens,...] [fmt,...] [mode,...]"""

import sys

import torch

from moeserve.bench.ep_virtual import experts_output, routes
from moeserve.bench.profile import profile_steps
from moeserve.distributed.ep.peer_to_peer import VirtualRanks
from moeserve.distributed.layout import ExpertMap

HIDDEN, TOP_K, EXPERTS = 7168, 8, 256


def exchange(ranks: int, tokens: int, fmt: str, low_latency: bool):
    device = torch.device("cuda")
    group = VirtualRanks(ExpertMap.contiguous(EXPERTS, ranks), fmt, HIDDEN, TOP_K, tokens, device,
                         low_latency=low_latency)
    generator = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(tokens, HIDDEN, device=device, generator=generator).bfloat16() for _ in range(ranks)]
    ids = routes(ranks, tokens, EXPERTS, TOP_K, False, generator, device)
    weights = [torch.rand(tokens, TOP_K, device=device, generator=generator) for _ in range(ranks)]

    received = group.dispatch(xs, ids, weights)  # the same routing each time: the same rows come back
    ys = experts_output(group, received)  # experts that return their input, written into the results areas

    def step():
        received = group.dispatch(xs, ids, weights)
        return group.combine(ys, [handle for _, _, handle in received])
    return step


def main():
    args = sys.argv[1:] + [None] * 4
    for ranks in (int(r) for r in (args[0] or "2,8").split(",")):
        for tokens in (int(t) for t in (args[1] or "128,4096").split(",")):
            for fmt in (args[2] or "bf16,fp8,nvfp4").split(","):
                for mode in (args[3] or "high-throughput,low-latency").split(","):
                    step = exchange(ranks, tokens, fmt, mode == "low-latency")
                    for _ in range(3):
                        step()
                    print(profile_steps(step, 5, torch.device("cuda")).report(
                        f"exchanges, {ranks} ranks x {tokens} tokens, {fmt}, {mode}").replace("step", "exchange"))


if __name__ == "__main__":
    main()
