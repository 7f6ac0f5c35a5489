"""Variant timings of the NVFP4 dispatch's two kernels on one GPU (issue 15): the put (tokens a program quantizes at
once, values per step, warps: ep_transport.NVFP4_PUT) and the receive (rows a program turns into bf16, and
whether in PTX: NVFP4_RECEIVE_ROWS, NVFP4_RECEIVE_PTX), each as the graph-replayed low-latency dispatch of R virtual
ranks x T tokens a rank (DeepSeek-V3 shape, uniform routing), the other kernel at its default. The copy of the moved
bytes beside it. Each variant's received tokens are first checked bit for bit against the default's (300 tokens a
rank). Last, the fastest put with the fastest receive, if that pair was not timed.
Usage: PYTHONPATH=. python3 scripts/probes/ep_nvfp4_variants.py [R,...] [T] [receive|put: only those variants]"""

import sys

import torch

from moeserve.bench.ep_virtual import measure_virtual, routes
from moeserve.distributed.ep.peer_to_peer import VirtualRanks
from moeserve.distributed.layout import ExpertMap
from moeserve.kernels import ep_transport

HIDDEN, TOP_K, EXPERTS = 7168, 8, 256
PUTS = [(1, 8192, 4), (1, 1024, 4), (1, 8192, 2), (1, 8192, 8), (2, 8192, 8)]
RECEIVES = [(8, True), (4, True), (4, False)]  # (rows, in PTX: NVFP4_RECEIVE_PTX)


def received_tokens(ranks: int, tokens: int = 300) -> list[torch.Tensor]:
    group = VirtualRanks(ExpertMap.contiguous(EXPERTS, ranks), "nvfp4", HIDDEN, TOP_K, tokens, "cuda", low_latency=True)
    generator = torch.Generator(device="cuda").manual_seed(1)
    xs = [torch.randn(tokens, HIDDEN, device="cuda", generator=generator).bfloat16() for _ in range(ranks)]
    ids = routes(ranks, tokens, EXPERTS, TOP_K, False, generator, "cuda")
    weights = [torch.rand(tokens, TOP_K, device="cuda", generator=generator) for _ in range(ranks)]
    out = []
    for (rows, layout, _), buffers in zip(group.dispatch(xs, ids, weights), group.buffers):
        real = (layout.slots >= 0).any(dim=1)  # rows that hold a token (the others are left unwritten)
        out.append(torch.cat((rows[real].view(torch.int16), buffers.recv[real].view(torch.int16)), dim=1))
    return out


def dispatch_us(ranks: int, tokens: int) -> tuple[float, float, float]:
    point = measure_virtual(ranks, tokens, HIDDEN, TOP_K, EXPERTS, "nvfp4", "cuda", iterations=10, low_latency=True)
    return point.graph_dispatch_us, point.graph_combine_us, point.copy_us


def set_variant(put, receive):
    ep_transport.NVFP4_PUT = put
    ep_transport.NVFP4_RECEIVE_ROWS, ep_transport.NVFP4_RECEIVE_PTX = receive


def main():
    args = sys.argv[1:] + [None] * 3
    tokens = int(args[1] or 4096)
    default_put = ep_transport.NVFP4_PUT
    default_receive = ep_transport.NVFP4_RECEIVE_ROWS, ep_transport.NVFP4_RECEIVE_PTX
    print(f"{'R':>2} {'put (rows, chunk, warps)':>26} {'receive (rows, PTX)':>20} {'dispatch us':>11} "
          f"{'combine us':>10} {'copy us':>8} {'ratio':>6}")
    for ranks in (int(r) for r in (args[0] or "2,8").split(",")):
        puts = [default_put] if args[2] == "receive" else PUTS
        receives = [] if args[2] == "put" else [receive for receive in RECEIVES if receive != default_receive]
        variants = [(put, default_receive) for put in puts] + [(default_put, receive) for receive in receives]
        set_variant(default_put, default_receive)
        expected = received_tokens(ranks)
        times = {variant: time_variant(ranks, tokens, *variant, expected) for variant in variants}
        best_put = min((v for v in times if v[1] == default_receive), key=times.get)[0]
        best_receive = min((v for v in times if v[0] == default_put), key=times.get)[1]
        if (best_put, best_receive) not in times:  # the two fastest together
            time_variant(ranks, tokens, best_put, best_receive, expected)
    set_variant(default_put, default_receive)


def time_variant(ranks: int, tokens: int, put, receive, expected) -> float:
    """Prints the variant's row (WRONG if its received tokens differ from the default's); its dispatch time, us (a
    wrong one: infinite)."""
    set_variant(put, receive)
    same = all(torch.equal(a, b) for a, b in zip(received_tokens(ranks), expected))
    dispatch, combine, copy = dispatch_us(ranks, tokens)
    print(f"{ranks:>2} {str(put):>26} {str(receive):>20} {dispatch:>11.0f} {combine:>10.0f} {copy:>8.0f} "
          f"{(dispatch + combine) / copy:>6.2f} {'' if same else 'WRONG: differs from the default'}", flush=True)
    torch.cuda.empty_cache()
    return dispatch if same else float("inf")


if __name__ == "__main__":
    main()
