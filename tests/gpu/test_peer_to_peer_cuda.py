"""The peer-to-peer transport's kernels on a GPU, with virtual ranks (R buffers on one device), at DeepSeek-V3's shape:
hidden 7168, top-8 of 256 experts; each rank's combined output equals the reference sum over its experts."""

import os

import pytest
import torch

from moeserve.distributed.ep.peer_to_peer import VirtualRanks
from moeserve.distributed.ep.token_formats import token_format
from moeserve.distributed.layout import ExpertMap
from moeserve.quant.formats import dequantized_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

HIDDEN, TOP_K, EXPERTS = 7168, 8, 256


@pytest.mark.parametrize("ranks", [2, 8])
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nvfp4"])
def test_virtual_ranks_on_cuda_equal_the_reference(ranks, fmt):
    torch.manual_seed(ranks)
    expert_map = ExpertMap.contiguous(EXPERTS, ranks)
    tokens_per_rank = [130 * (r % 3) for r in range(ranks)]  # 0, 130, 260, ...: one rank without tokens
    xs = [torch.randn(t, HIDDEN, device="cuda").bfloat16() for t in tokens_per_rank]
    ids = [torch.rand(t, EXPERTS, device="cuda").argsort(dim=1)[:, :TOP_K] for t in tokens_per_rank]
    weights = [torch.rand(t, TOP_K, device="cuda") for t in tokens_per_rank]
    group = VirtualRanks(expert_map, fmt, HIDDEN, TOP_K, max_tokens=max(tokens_per_rank), device="cuda")
    received = group.dispatch(xs, ids, weights)
    ys = []
    for rank, (tokens, layout, _) in enumerate(received):
        x = dequantized_tokens(tokens).float()
        slot = rank * expert_map.slots_per_rank + layout.slots
        ys.append((x * torch.where(layout.slots >= 0, layout.weights * (slot + 1), 0.0).sum(1, keepdim=True)).bfloat16())
    outs = group.combine(ys, [handle for _, _, handle in received])
    round_trip = token_format(fmt, torch.bfloat16)
    for x, i, w, out in zip(xs, ids, weights, outs):
        if not x.shape[0]:
            assert out.shape == x.shape
            continue
        sent = round_trip.unpack(round_trip.pack(x), HIDDEN, torch.float32)
        expected = sent * (w * (i + 1).float()).sum(dim=1, keepdim=True)
        assert torch.isfinite(out).all()
        error = ((out.float() - expected).norm() / expected.norm()).item()
        assert error < 1e-2, error  # each rank's part rounded to bf16 once, summed in fp32


def symmetric_memory_rank(rank, world, low_latency):
    """One EP rank in its own process, its buffers in PyTorch's symmetric memory (ranks may share a GPU)."""
    import torch.distributed as dist

    from moeserve.distributed.ep.peer_to_peer import PeerToPeerRank, PeerTransport

    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    if torch.cuda.device_count() < world:  # ranks sharing a GPU: torch refuses the rendezvous unless told
        os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
    expert_map = ExpertMap.contiguous(EXPERTS, world)
    generator = torch.Generator(device=device).manual_seed(rank)
    tokens = 64 + 32 * rank
    x = torch.randn(tokens, HIDDEN, device=device, generator=generator).bfloat16()
    ids = torch.rand(tokens, EXPERTS, device=device, generator=generator).argsort(dim=1)[:, :TOP_K]
    weights = torch.rand(tokens, TOP_K, device=device, generator=generator)
    transport = PeerTransport(dist.group.WORLD, world, 128, low_latency_tokens=128)  # as the engine makes its buffers
    transport.low_latency = low_latency
    me = PeerToPeerRank(expert_map, rank, "fp8", transport, device, torch.bfloat16)
    outs = []
    for _ in range(2):  # (the same tokens twice: the CPU tests vary them between exchanges)
        received, layout, handle = me.dispatch(x, ids, weights)
        slot = rank * expert_map.slots_per_rank + layout.slots
        factor = torch.where(layout.slots >= 0, layout.weights * (slot + 1), 0.0).sum(1, keepdim=True)
        outs.append(me.combine((received.dequantize().float() * factor).bfloat16(), handle).cpu())
    return x.cpu(), ids.cpu(), weights.cpu(), outs


@pytest.mark.parametrize("low_latency", [False, True], ids=["high-throughput", "low-latency"])
def test_two_processes_exchange_through_symmetric_memory(low_latency):
    from tests.distributed.harness import run_ranks

    results = run_ranks(2, symmetric_memory_rank, low_latency)
    round_trip = token_format("fp8", torch.bfloat16)
    for x, ids, weights, outs in results:
        sent = round_trip.unpack(round_trip.pack(x), HIDDEN, torch.float32)
        expected = sent * (weights * (ids + 1).float()).sum(dim=1, keepdim=True)
        for out in outs:
            assert torch.isfinite(out).all()
            assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize("fmt,variant", [("fp8", {}), ("nvfp4", {}), ("nvfp4", {"NVFP4_PUT": (1, 1024, 4)})],
                         ids=["fp8", "nvfp4", "nvfp4-in-steps"])
def test_quantized_inside_the_put_on_cuda_writes_the_rows_the_format_writes(fmt, variant, monkeypatch):
    """The fused put (the CUDA default) against the torch format's packing, byte for byte, with ties, zeros, a NaN and
    an inf among the values: FP8 in steps of 1024, NVFP4 whole rows or in steps."""
    from moeserve.kernels import ep_transport

    for name, value in variant.items():
        monkeypatch.setattr(ep_transport, name, value)
    torch.manual_seed(0)
    expert_map = ExpertMap.contiguous(EXPERTS, 4)
    xs = [(torch.randn(t, HIDDEN, device="cuda") * torch.logspace(-4, 3, HIDDEN, device="cuda")).bfloat16()
          for t in (40, 7, 0, 100)]
    xs[0][1, :128] = 0  # an all-zero group
    xs[0][2, 5] = -1e-30  # a negative that rounds to zero
    xs[0][3] = 0
    xs[0][3, :16] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -2.5, 0.5, 3.0, 4.0, -6.0, 1.0, 0.0])
    xs[0][3, 16] = 2688.0  # NVFP4: global scale 1, block scale 1: codes at every tie
    xs[0][4, 40] = float("nan")  # NaN scales, codes 0
    xs[0][5, 200] = float("inf")
    xs[1][0] *= 1e-31  # NVFP4: the global scale at its floor (amax ~1e-28)
    xs[1][1] *= 1e-38  # NVFP4: flushed to zeros there (amax ~1e-35)
    ids = [torch.rand(x.shape[0], EXPERTS, device="cuda").argsort(dim=1)[:, :TOP_K] for x in xs]
    weights = [torch.rand(x.shape[0], TOP_K, device="cuda") for x in xs]
    areas = []
    for fused in (False, True):
        group = VirtualRanks(expert_map, fmt, HIDDEN, TOP_K, max_tokens=100, device="cuda", fuse_quantization=fused)
        received = group.dispatch(xs, ids, weights)
        areas.append([b.recv[: layout.slots.shape[0]].clone() for b, (_, layout, _) in zip(group.buffers, received)])
    for unfused, fused in zip(*areas):
        wrong = (unfused != fused).nonzero()[:8].tolist()
        assert not wrong, [(row, byte, int(unfused[row, byte]), int(fused[row, byte])) for row, byte in wrong]


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nvfp4"])
def test_low_latency_exchange_captured_in_a_cuda_graph_equals_eager(fmt):
    """Low-latency mode never waits on the host: dispatch and combine of 4 virtual ranks captured as CUDA graphs,
    replayed over new tokens and routes copied into the captured inputs, equal the eager exchange of those tokens."""
    from moeserve.bench.timing import graph_of

    torch.manual_seed(1)
    expert_map = ExpertMap.contiguous(EXPERTS, 4)

    def inputs():
        ids = [torch.rand(64, EXPERTS, device="cuda").argsort(dim=1)[:, :TOP_K] for _ in range(4)]
        return [torch.randn(64, HIDDEN, device="cuda").bfloat16() for _ in range(4)], ids, [
            torch.rand(64, TOP_K, device="cuda") for _ in range(4)]

    group = VirtualRanks(expert_map, fmt, HIDDEN, TOP_K, max_tokens=64, device="cuda", low_latency=True)
    xs, ids, weights = inputs()
    state = {}

    def step():
        received = group.dispatch(xs, ids, weights)
        state["out"] = group.combine(toy_experts(received), [handle for _, _, handle in received])

    replay = graph_of(step)
    assert replay is not None, "the low-latency exchange could not be captured"
    new_xs, new_ids, new_weights = inputs()
    for captured, new in zip((*xs, *ids, *weights), (*new_xs, *new_ids, *new_weights)):
        captured.copy_(new)
    replay()
    graphed = [out.clone() for out in state["out"]]
    eager = VirtualRanks(expert_map, fmt, HIDDEN, TOP_K, max_tokens=64, device="cuda", low_latency=True)
    received = eager.dispatch(new_xs, new_ids, new_weights)
    for got, want in zip(graphed, eager.combine(toy_experts(received), [handle for _, _, handle in received])):
        assert torch.isfinite(want).all() and torch.equal(got, want)


def toy_experts(received):
    return [(dequantized_tokens(t).float()
             * (layout.weights * (layout.slots + 1)).sum(1, keepdim=True)).bfloat16() for t, layout, _ in received]


def through_the_halves(group, xs, ids, weights):
    """Each rank's dispatch_send, then each one's dispatch_recv, the experts (writing into each rank's results area, as
    the engine's do), combine_send, combine_recv (the order of one rank's step; the puts and gets on each rank's own
    stream when it has comm_sms). Before the receives, the compute stream waits for every rank's puts, and every
    rank's results are written before any combine_send reads them: across GPUs the barriers do that."""
    from moeserve.distributed.ep.peer_to_peer import OnStream

    sent = [rank.dispatch_send(x, i, w) for rank, x, i, w in zip(group.ranks, xs, ids, weights)]
    for s in sent:
        OnStream.join(s.done, "cuda")
    received = [rank.dispatch_recv(s) for rank, s in zip(group.ranks, sent)]
    ys = [rank.results_buffer(handle).copy_(y) for rank, y, (_, _, handle) in zip(group.ranks, toy_experts(received),
                                                                                   received)]
    back = [rank.combine_send(y, handle) for rank, y, (_, _, handle) in zip(group.ranks, ys, received)]
    for _, _, done in back:
        OnStream.join(done, "cuda")
    return [rank.combine_recv(b) for rank, b in zip(group.ranks, back)]


@pytest.mark.parametrize("ranks,low_latency", [(1, False), (4, True)], ids=["high-throughput", "low-latency"])
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nvfp4"])
def test_puts_on_their_own_stream_with_an_sm_budget_equal_the_inline_exchange(ranks, low_latency, fmt):
    """--ep-comm-sms: the puts on a side stream, at most 6 programs each, joined back before the receive; eager and
    captured in a CUDA graph (fork and join inside the capture), bit for bit the inline exchange. (High-throughput
    halves need a barrier between ranks' counts and rows: one rank here.)"""
    from moeserve.bench.timing import graph_of

    torch.manual_seed(2)
    expert_map = ExpertMap.contiguous(EXPERTS, ranks)
    xs = [torch.randn(96, HIDDEN, device="cuda").bfloat16() for _ in range(ranks)]
    ids = [torch.rand(96, EXPERTS, device="cuda").argsort(dim=1)[:, :TOP_K] for _ in range(ranks)]
    weights = [torch.rand(96, TOP_K, device="cuda") for _ in range(ranks)]
    inline = VirtualRanks(expert_map, fmt, HIDDEN, TOP_K, max_tokens=96, device="cuda", low_latency=low_latency)
    want = through_the_halves(inline, xs, ids, weights)
    side = VirtualRanks(expert_map, fmt, HIDDEN, TOP_K, max_tokens=96, device="cuda", low_latency=low_latency,
                        comm_sms=6)
    assert side.ranks[0].transport.stream("cuda") is not None
    got = through_the_halves(side, xs, ids, weights)
    for g, w in zip(got, want):
        assert torch.isfinite(w).all() and torch.equal(g, w)
    if low_latency:
        state = {}
        replay = graph_of(lambda: state.update(out=through_the_halves(side, xs, ids, weights)))
        assert replay is not None, "the side-stream exchange could not be captured"
        for x in xs:
            x.mul_(-1)  # new tokens in the captured inputs
        replay()
        for g, w in zip(state["out"], through_the_halves(inline, xs, ids, weights)):
            assert torch.equal(g, w)


@pytest.mark.parametrize("rows_at_once", [1, 4])
@pytest.mark.parametrize("ptx", [False, True])
def test_the_nvfp4_receive_equals_the_torch_unpack_bit_for_bit(rows_at_once, ptx, monkeypatch):
    """The receive's conversion of NVFP4 rows (strided, as in a receive area; some not in use) at DeepSeek-V3's hidden
    size, against the token format's torch unpack; the conversion in Triton and in PTX."""
    from moeserve.distributed.ep.token_formats import Nvfp4Format
    from moeserve.kernels import ep_transport
    from moeserve.kernels.ep_transport import nvfp4_tokens

    monkeypatch.setattr(ep_transport, "NVFP4_RECEIVE_PTX", ptx)

    torch.manual_seed(rows_at_once)
    fmt = Nvfp4Format()
    x = (torch.randn(67, HIDDEN, device="cuda") * 10.0 ** torch.linspace(-4, 2, HIDDEN // 16, device="cuda")
         .repeat_interleave(16)).bfloat16()
    x[3, :8] = -1e-12  # negative values that round to a negative zero code beside larger ones in their block
    x[5, 7] = float("nan")
    packed = fmt.pack(x)
    area = torch.zeros(67, packed.shape[1] + 60, dtype=torch.uint8, device="cuda")
    area[:, :packed.shape[1]] = packed
    payload = area[:, :packed.shape[1]]  # rows strided as the receive area's
    want = fmt.unpack(payload, HIDDEN, torch.bfloat16)
    in_use = torch.rand(67, device="cuda") < 0.7
    in_use[40:52] = False  # whole programs of unused rows (they stop early)
    got = nvfp4_tokens(payload, HIDDEN, torch.bfloat16, in_use, rows_at_once)
    assert want[5].isnan().all() and torch.equal(got[in_use].isnan(), want[in_use].isnan())  # the NaN token
    assert torch.equal(got[in_use].nan_to_num().view(torch.int16), want[in_use].nan_to_num().view(torch.int16))
