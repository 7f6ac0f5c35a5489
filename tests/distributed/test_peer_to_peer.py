"""The peer-to-peer transport on virtual ranks (R buffers in one process; the kernels under the Triton interpreter):
every rank receives exactly the tokens that have an expert there, with their local slots and weights, and combine
returns each token's sum over its experts, as the all-to-all dispatcher does."""

from dataclasses import replace

import pytest
import torch
import triton
import triton.language as tl

from moeserve.distributed.ep.peer_to_peer import Transport, VirtualRanks
from moeserve.distributed.ep.token_formats import token_format
from moeserve.distributed.layout import ExpertMap
from moeserve.kernels.ep_transport import _e2m1_codes
from moeserve.quant.formats import dequantized_tokens
from moeserve.quant.fp8 import Fp8Activations

HIDDEN, TOP_K, EXPERTS = 256, 3, 12


def routing(tokens: int, case: str, generator) -> tuple[torch.Tensor, torch.Tensor]:
    choices = EXPERTS // 4 if case == "one rank" else EXPERTS  # "one rank": experts of rank 0 only
    ids = torch.rand(tokens, choices, generator=generator).argsort(dim=1)[:, :TOP_K]
    return ids, torch.rand(tokens, TOP_K, generator=generator)


def toy_experts(tokens, layout, ep_rank: int, slots_per_rank: int) -> torch.Tensor:
    """Each received row's sum over its experts here of weight * x * (physical slot + 1)."""
    x = dequantized_tokens(tokens).float()
    here = layout.slots >= 0
    factor = torch.where(here, layout.weights * (ep_rank * slots_per_rank + layout.slots + 1).float(), 0.0)
    return x * factor.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("case", ["random", "one rank"])
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@pytest.mark.parametrize("low_latency", [False, True], ids=["high-throughput", "low-latency"])
@pytest.mark.parametrize("fused", [False, True], ids=["torch-layout", "fused-as-on-cuda"])
def test_virtual_ranks_dispatch_and_combine_like_the_reference(ranks, case, fmt, low_latency, fused):
    generator = torch.Generator().manual_seed(ranks * 10 + len(case))
    expert_map = ExpertMap.contiguous(EXPERTS, ranks)
    group = VirtualRanks(expert_map, fmt, HIDDEN, TOP_K, max_tokens=16, device="cpu", dtype=torch.float32,
                         low_latency=low_latency, fuse_layout=fused, fuse_quantization=fused)
    # new tokens each exchange, over the last one's rows and counts: a rank with none, a full rank, fewer than before
    for tokens_per_rank in ([5, 0, 9, 3], [16, 2, 0, 7], [1, 0, 0, 0]):
        tokens_per_rank = tokens_per_rank[:ranks]
        xs = [torch.randn(t, HIDDEN, generator=generator) for t in tokens_per_rank]
        routes = [routing(t, case, generator) for t in tokens_per_rank]
        received = group.dispatch(xs, [ids for ids, _ in routes], [w for _, w in routes])
        if low_latency:  # every region's rows, fixed shapes: those with no token carry no experts
            assert all(layout.slots.shape == (ranks * 16, TOP_K) for _, layout, _ in received)
            received = [real_rows(*r, rank) for rank, r in enumerate(received)]
        check_received(received, routes, tokens_per_rank, expert_map, ranks)
        combine_and_check(group, received, xs, routes, expert_map, fmt, overwrite_counts=True)


def sources(handle, rank: int):
    """(the source rank of each received row, which rows hold a token: None in high-throughput mode, where all do), as
    the receiver's count matrix says after the exchange."""
    buffers = handle.memory.buffers
    ranks = buffers.counts.shape[0]
    counts = buffers.counts[:, rank].long()
    if handle.first is not None:  # rows grouped by source, counts[s] from s
        return torch.repeat_interleave(torch.arange(ranks), counts), None
    region = torch.arange(ranks).repeat_interleave(buffers.max_tokens)  # low latency: region s holds counts[s] rows
    real = torch.arange(buffers.max_tokens).repeat(ranks) < counts[region]
    return region[real], real


def real_rows(tokens, layout, handle, rank: int):
    """The rows of a low-latency receive that hold tokens, in order."""
    real = sources(handle, rank)[1]
    assert (layout.slots[~real] == -1).all() and (layout.weights[~real] == 0).all()
    tokens = Fp8Activations(tokens.values[real], tokens.scales[real], tokens.dtype) if isinstance(
        tokens, Fp8Activations) else tokens[real]
    return tokens, type(layout)(layout.slots[real], layout.weights[real]), handle, real


def check_received(received, routes, tokens_per_rank, expert_map, ranks):
    for rank, (tokens, layout, handle, *real) in enumerate(received):
        source = sources(handle, rank)[0]
        sent_here = [(s, t) for s in range(ranks) for t in range(tokens_per_rank[s])
                     if (routes[s][0][t] // expert_map.slots_per_rank == rank).any()]
        assert layout.slots.shape[0] == len(sent_here)  # each token once per rank it has experts on
        assert source.tolist() == [s for s, _ in sent_here]  # grouped by source, in token order
        for row, (s, t) in enumerate(sent_here):
            ids, weights = routes[s][0][t], routes[s][1][t]
            mine = ids // expert_map.slots_per_rank == rank
            assert layout.slots[row].tolist() == torch.where(mine, ids % expert_map.slots_per_rank, -1).tolist()
            torch.testing.assert_close(layout.weights[row], torch.where(mine, weights, 0.0))



def combine_and_check(group, received, xs, routes, expert_map, fmt, overwrite_counts: bool = False):
    """The combine of the toy experts' results: odd ranks write them into their results area, as the engine's experts
    do, even ranks hand them over (copied there). overwrite_counts: every count matrix is garbage by then, as when a
    peer's next exchange puts its counts before this rank's gets."""
    ys = []
    for rank, (tokens, layout, handle, *real) in enumerate(received):
        y = toy_experts(tokens, layout, rank, expert_map.slots_per_rank)
        if real:  # results of every row slot, as the experts give them for the whole receive area
            y = torch.zeros(real[0].shape[0], y.shape[1]).index_copy_(0, real[0].nonzero().flatten(), y)
        ys.append(group.ranks[rank].results_buffer(handle).copy_(y) if rank % 2 else y)
    if overwrite_counts:
        for _, _, handle, *_ in received:
            handle.memory.buffers.counts.fill_(1000)
    outs = group.combine(ys, [handle for _, _, handle, *_ in received])
    round_trip = token_format(fmt, torch.float32)
    for s, (x, (ids, weights)) in enumerate(zip(xs, routes)):
        sent = round_trip.unpack(round_trip.pack(x), HIDDEN, torch.float32) if x.shape[0] else x
        expected = sent * (weights * (ids + 1).float()).sum(dim=1, keepdim=True)
        assert outs[s].shape == x.shape and torch.isfinite(outs[s]).all()
        torch.testing.assert_close(outs[s], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,nvfp4_put", [("bf16", None), ("fp8", None), ("nvfp4", None), ("nvfp4", (4, 128, 4))],
                         ids=["bf16", "fp8", "nvfp4", "nvfp4-4-tokens-at-once"])
def test_two_micro_batches_in_flight_keep_their_own_rows_with_the_puts_on_few_programs(fmt, nvfp4_put, monkeypatch):
    """Two-batch overlap: the second micro-batch dispatches before the first's combine, through its own buffer set;
    the puts capped at one program (the SM budget) loop over every token and row, 8 at a time (NVFP4: as many as it
    quantizes at once)."""
    from moeserve.kernels import ep_transport

    if nvfp4_put:
        monkeypatch.setattr(ep_transport, "NVFP4_PUT", nvfp4_put)
    generator = torch.Generator().manual_seed(11)
    expert_map = ExpertMap.contiguous(EXPERTS, 2)
    group = VirtualRanks(expert_map, fmt, HIDDEN, TOP_K, max_tokens=16, device="cpu", dtype=torch.float32,
                         micro_batches=2, comm_sms=1, fuse_layout=True, fuse_quantization=True)
    batches = []
    for micro_batch, tokens_per_rank in enumerate(([9, 16], [13, 2])):
        xs = [torch.randn(t, HIDDEN, generator=generator) for t in tokens_per_rank]
        routes = [routing(t, "random", generator) for t in tokens_per_rank]
        received = group.dispatch(xs, [ids for ids, _ in routes], [w for _, w in routes], micro_batch)
        batches.append((xs, routes, tokens_per_rank, received))
    for xs, routes, tokens_per_rank, received in batches:  # the first's rows, after the second's puts
        check_received(received, routes, tokens_per_rank, expert_map, 2)
        combine_and_check(group, received, xs, routes, expert_map, fmt)


def test_the_halves_of_an_exchange_run_rank_by_rank_in_low_latency_mode():
    """dispatch_send / dispatch_recv / combine_send / combine_recv, each for every rank in turn (the barriers between
    are no-ops on one device): what the whole calls give."""
    generator = torch.Generator().manual_seed(12)
    expert_map = ExpertMap.contiguous(EXPERTS, 2)
    group = VirtualRanks(expert_map, "bf16", HIDDEN, TOP_K, max_tokens=8, device="cpu", dtype=torch.float32,
                         low_latency=True)
    tokens_per_rank = [7, 3]
    xs = [torch.randn(t, HIDDEN, generator=generator) for t in tokens_per_rank]
    routes = [routing(t, "random", generator) for t in tokens_per_rank]
    sent = [rank.dispatch_send(x, ids, w) for rank, x, (ids, w) in zip(group.ranks, xs, routes)]
    received = [real_rows(*rank.dispatch_recv(s), r) for r, (rank, s) in enumerate(zip(group.ranks, sent))]
    check_received(received, routes, tokens_per_rank, expert_map, 2)
    combine_and_check(Halves(group.ranks), received, xs, routes, expert_map, "bf16")


class Halves:
    """A combine through each rank's halves (inline: combine_send stores the results, combine_recv reads the sums)."""

    def __init__(self, ranks):
        self.ranks = ranks

    def combine(self, ys, handles):
        sent = [rank.combine_send(y, handle) for rank, y, handle in zip(self.ranks, ys, handles)]
        return [rank.combine_recv(s) for rank, s in zip(self.ranks, sent)]


def test_more_tokens_than_the_buffers_hold_is_a_clear_error():
    expert_map = ExpertMap.contiguous(EXPERTS, 2)
    group = VirtualRanks(expert_map, "bf16", HIDDEN, TOP_K, max_tokens=4, device="cpu", dtype=torch.float32)
    ids, weights = routing(5, "random", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="ep-max-tokens-per-rank"):
        group.dispatch([torch.randn(5, HIDDEN), torch.randn(1, HIDDEN)], [ids, ids[:1]], [weights, weights[:1]])


def test_the_buffers_are_sized_for_every_rank_sending_all_its_tokens():
    expert_map = ExpertMap.contiguous(EXPERTS, 4)
    group = VirtualRanks(expert_map, "fp8", HIDDEN, TOP_K, max_tokens=16, device="cpu", dtype=torch.bfloat16)
    row = -(-(HIDDEN + HIDDEN // 32 + 8 * TOP_K) // 64) * 64  # padded to 64 bytes
    assert group.buffers[0].recv.shape == (4 * 16, row) and group.buffers[0].results.shape == (4 * 16, HIDDEN)
    assert group.buffers[0].nbytes == 4 * 4 * 4 + 4 * 16 * row + 4 * 16 * HIDDEN * 2


def test_bench_ep_with_virtual_ranks_reports_every_point(capsys):
    from moeserve.cli import main

    assert main(["bench", "ep", "--virtual-ranks", "2,4", "--device", "cpu", "--hidden", "256", "--experts", "8",
                 "--topk", "2", "--tokens-per-rank", "0,4", "--format", "bf16,fp8", "--iterations", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2 * 2 * 2 * 2 * 2  # rank counts x tokens x formats x modes x routings
    for ranks, tokens, fmt, mode, routing, _, _, graph_dispatch, graph_combine, written, between, per_expert, *_ in rows:
        assert graph_dispatch.strip() == graph_combine.strip() == "-"  # CUDA graphs: low latency on CUDA only
        if int(tokens) == 0:
            assert float(written) == float(between) == float(per_expert) == 0
        else:
            assert 0 <= float(between) <= float(written) <= float(per_expert)  # sent once per rank, not per expert
            assert float(written) > 0


@pytest.mark.parametrize("fmt,variant,hidden", [
    ("fp8", {}, HIDDEN), ("fp8", {}, 640),
    ("nvfp4", {"NVFP4_PUT": (1, 1024, 4)}, HIDDEN), ("nvfp4", {"NVFP4_PUT": (4, 128, 4)}, HIDDEN),
    ("nvfp4", {"NVFP4_PUT": (2, 8192, 4)}, 640), ("nvfp4", {"NVFP4_PUT": (1, 1024, 4)}, 640)],
    ids=["fp8", "fp8-hidden-640", "nvfp4", "nvfp4-4-tokens-at-once",
         "nvfp4-whole-rows-masked", "nvfp4-hidden-640"])
@pytest.mark.parametrize("ranks", [2, 3])
def test_quantized_inside_the_put_writes_the_rows_the_format_writes(ranks, fmt, variant, hidden, monkeypatch):
    """The fused put (default on CUDA) fills every receive area byte for byte as packing with the torch format does
    (FP8: steps of 1024 or 128 values; NVFP4: a token at a time, or 4 at once in steps of
    128 values, or two whole rows of 640 values at once in one masked step of 1024)."""
    from moeserve.kernels import ep_transport

    for name, value in variant.items():
        monkeypatch.setattr(ep_transport, name, value)
    generator = torch.Generator().manual_seed(ranks)
    expert_map = ExpertMap.contiguous(EXPERTS, ranks)
    xs = [torch.randn(t, hidden, generator=generator) * torch.logspace(-3, 2, hidden) for t in (6, 4, 0)[:ranks]]
    xs[0][1, :128] = 0  # an all-zero group
    xs[0][2, 5] = -1e-30  # a negative that rounds to zero
    xs[1][0] *= 1e-30  # tiny values: block scales near E4M3's subnormals (NVFP4: the global scale at its floor)
    xs[1][1] *= 1e-36  # NVFP4: codes of 0 (a few 0.5) under the global scale's floor
    ties = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -2.5, 0.5, 3.0, 4.0, -6.0, 1.0, 0.0])
    xs[0][3] = 0.0
    xs[0][3, :16], xs[0][3, 16] = ties, 2688.0  # NVFP4: global scale 1, block scale 1: codes at every tie
    xs[0][4, 40] = float("nan")  # a NaN token: NaN scales, codes 0
    xs[0][5, 200] = float("inf")  # an inf: NVFP4's global scale inf, the inf's code 0 (inf * 0), the others +-0
    routes = [routing(x.shape[0], "random", generator) for x in xs]
    areas = []
    for fused in (False, True):
        group = VirtualRanks(expert_map, fmt, hidden, TOP_K, max_tokens=8, device="cpu", dtype=torch.float32,
                             fuse_quantization=fused)
        received = group.dispatch(xs, [ids for ids, _ in routes], [w for _, w in routes])
        areas.append([b.recv[: layout.slots.shape[0]].clone() for b, (_, layout, _) in zip(group.buffers, received)])
    for unfused, fused in zip(*areas):
        assert unfused.shape[0] and torch.equal(unfused, fused)


@pytest.mark.parametrize("ranks,tokens,block_tokens", [(2, 7, None), (3, 300, 64), (3, 300, None), (4, 0, None)])
def test_the_kernel_layout_equals_the_torch_layout(ranks, tokens, block_tokens):  # 300 in 64s: five blocks
    """route_rows (default on CUDA) against PeerToPeerRank.layout: row indices, metadata bytes and the counts every
    peer receives, with redundant experts (replicas chosen by token and rank) in the map."""
    from moeserve.distributed.ep.peer_to_peer import BufferSet, GivenBuffers, PeerBuffers, PeerToPeerRank, tables_of

    generator = torch.Generator().manual_seed(tokens + ranks)
    per_rank = EXPERTS // ranks  # each rank: its own experts and a replica of the next rank's first one
    by_rank = [list(range(r * per_rank, (r + 1) * per_rank)) + [(r + 1) * per_rank % EXPERTS] for r in range(ranks)]
    expert_map = ExpertMap(tuple(e for rank in by_rank for e in rank), ranks)
    ids, weights = routing(tokens, "random", generator)
    buffers = [PeerBuffers(ranks, max(tokens, 1), 4, 4, torch.float32, "cpu") for _ in range(ranks)]
    for b in buffers:
        b.counts.fill_(-7)  # what an earlier exchange left: every count must be written, zeros too
    tables = tables_of(buffers, "cpu")
    me = ranks - 1
    rank = PeerToPeerRank(expert_map, me, "bf16", GivenBuffers([BufferSet(buffers[me], tables)]), "cpu", torch.float32)
    expected_index, expected_meta, expected_counts = rank.layout(ids, weights)
    from moeserve.kernels.ep_transport import route_rows

    index, meta = route_rows(ids, weights, rank.replica_slots, rank.replica_count, rank.slots_per_rank, me,
                             tables.counts, block_tokens)
    assert torch.equal(index, expected_index)
    assert torch.equal(meta, expected_meta)
    for b in buffers:
        assert torch.equal(b.counts[me], expected_counts)


def test_tokens_that_do_not_match_the_buffers_are_refused_before_any_put():
    expert_map = ExpertMap.contiguous(EXPERTS, 2)
    group = VirtualRanks(expert_map, "bf16", HIDDEN, TOP_K, max_tokens=4, device="cpu", dtype=torch.bfloat16)
    ids, weights = routing(3, "random", torch.Generator().manual_seed(0))
    wide = 8 + TOP_K  # 64 bytes more metadata: past the padded rows
    wide_ids, wide_weights = ids.repeat(1, 4)[:, :wide], weights.repeat(1, 4)[:, :wide]
    for x, k in ((torch.randn(3, HIDDEN), TOP_K), (torch.randn(3, 128).bfloat16(), TOP_K),
                 (torch.randn(3, HIDDEN).bfloat16(), wide)):
        with pytest.raises(ValueError, match="do not match the transport"):
            group.ranks[0].send_counts(x, wide_ids[:, :k], wide_weights[:, :k])
    assert (group.buffers[1].counts == 0).all()  # nothing was written


def test_the_p2p_backend_is_refused_on_the_cpu_with_what_to_use():
    from moeserve.config import ConfigError
    from moeserve.engine.args import EngineArgs

    with pytest.raises(ConfigError, match="needs a CUDA device.*all_to_all"):
        EngineArgs(model="tiny-deepseek-v3", device="cpu", ep_backend="p2p")
    with pytest.raises(ConfigError, match="ep_max_tokens_per_rank"):
        EngineArgs(model="tiny-deepseek-v3", ep_max_tokens_per_rank=0)
    with pytest.raises(ConfigError, match="ep_two_batch_overlap.*needs ep > 1"):
        EngineArgs(model="tiny-deepseek-v3", ep_two_batch_overlap=True)
    with pytest.raises(ConfigError, match="ep_comm_sms.*at least 1"):
        EngineArgs(model="tiny-deepseek-v3", ep=2, dp=2, ep_comm_sms=0)


def test_parallelize_gives_every_moe_layer_a_p2p_rank_sharing_one_transport():
    """On the meta device (as plan and the engine build models): no buffers yet, one transport for all layers; on the
    CPU a clear error."""
    from moeserve.config import ConfigError
    from moeserve.distributed.ep.peer_to_peer import PeerToPeerRank
    from moeserve.distributed.layout import ParallelLayout
    from moeserve.distributed.parallelize import ParallelOptions
    from moeserve.engine.plan import PlanningGroups
    from moeserve.layers.moe.moe import MoE
    from moeserve.loader.build import build_model
    from moeserve.loader.model_loader import load_config

    config = load_config("tiny-deepseek-v3")
    groups = PlanningGroups(ParallelLayout(dp=2, ep=2), 1)
    model = build_model(config, torch.bfloat16, "meta", parallel=ParallelOptions(groups, "fp8", "p2p",
                                                                                 ep_max_tokens_per_rank=64))
    ranks = [m.dispatcher for m in model.modules() if isinstance(m, MoE)]
    assert ranks and all(isinstance(r, PeerToPeerRank) and not r.transport.made and r.ep_rank == 1 for r in ranks)
    assert len({id(r.transport) for r in ranks}) == 1 and ranks[0].transport.max_tokens == 64
    with pytest.raises(ConfigError, match="needs CUDA devices"):
        build_model(config, torch.bfloat16, "cpu", parallel=ParallelOptions(groups, "fp8", "p2p"))


def test_plan_counts_the_p2p_buffers_as_the_transport_allocates_them():
    from moeserve.distributed.ep.peer_to_peer import PeerBuffers
    from moeserve.distributed.layout import ParallelLayout
    from moeserve.engine.plan import Request, ep_buffer_bytes
    from moeserve.loader.model_loader import load_config

    config = load_config("deepseek-v3")
    request = Request(config, ParallelLayout(dp=8, ep=8), max_num_batched_tokens=16, ep_dispatch_format="fp8",
                      ep_backend="p2p")
    row = -(-(config.hidden_size + config.hidden_size // 32 + 8 * config.moe.top_k) // 64) * 64
    buffers = PeerBuffers(8, 16, row, config.hidden_size, torch.bfloat16, "meta")
    assert ep_buffer_bytes(request) == 2 * buffers.nbytes > 0  # and the low-latency set (the graphs' 16 tokens)
    assert ep_buffer_bytes(replace(request, enforce_eager=True)) == buffers.nbytes
    assert ep_buffer_bytes(replace(request, ep_two_batch_overlap=True)) == 3 * buffers.nbytes  # a set per micro-batch
    assert ep_buffer_bytes(Request(config, ParallelLayout(dp=8, ep=8), ep_backend="all_to_all")) == 0  # NCCL: per step
    auto = Request(config, ParallelLayout(dp=8, ep=8), max_num_batched_tokens=16, ep_dispatch_format="fp8")
    assert ep_buffer_bytes(auto) == 2 * buffers.nbytes  # auto: p2p, the GPUs of one node


def test_bench_ep_refuses_the_p2p_backend_on_the_cpu(capsys):
    from moeserve.cli import main

    for backend in ("p2p", "all_to_all,p2p-ll"):
        assert main(["bench", "ep", "--backend", backend, "--device", "cpu", "--ranks", "2"]) != 0
        assert "virtual-ranks" in capsys.readouterr().err
    assert main(["bench", "ep", "--backend", "nccl", "--device", "cpu", "--ranks", "2"]) != 0
    assert "unknown --backend nccl" in capsys.readouterr().err
    for budgets in ("0", "none,sixteen"):  # SM budgets of the p2p puts and gets: none or positive counts
        assert main(["bench", "ep", "--backend", "all_to_all", "--comm-sms", budgets, "--device", "cpu"]) != 0
        assert "--comm-sms takes none or positive SM counts" in capsys.readouterr().err


def test_bench_ep_reads_sm_budgets():
    from moeserve.cli import comm_sms_budgets

    assert comm_sms_budgets("none,16, 32") == [None, 16, 32]


def test_p2p_buffers_hold_a_ranks_share_of_the_largest_step_and_the_memory_profile():
    from moeserve.engine.plan import ep_tokens_per_rank, profile_batch_shape

    for tokens, model_len in ((5001, 4096), (2049, 4096), (8192, 200), (8192, 4096)):
        batch, seq_len = profile_batch_shape(tokens, model_len)
        assert ep_tokens_per_rank(tokens, model_len, 1) == max(tokens, batch * seq_len)  # the profile may round up
    assert ep_tokens_per_rank(8192, 4096, 4) == 2048  # a tp group splits the step's tokens
    assert ep_tokens_per_rank(8192, 4096, 4, given=5000) == 5000


class FakeTransport(Transport):
    """Hands out one virtual rank's buffers of the current mode, as PeerTransport its symmetric ones."""

    def __init__(self, sets):
        self.sets, self.low_latency, self.calls = sets, False, []  # sets: low_latency -> BufferSet

    def buffer_set(self, micro_batch, row_bytes, hidden, dtype, device):
        self.calls.append((row_bytes, hidden, dtype, self.low_latency, micro_batch))
        return self.sets[self.low_latency]


class RanksOf:
    """VirtualRanks' combine over ranks made elsewhere."""

    def __init__(self, ranks):
        self.ranks = ranks

    combine = VirtualRanks.combine


def test_ranks_take_their_buffers_from_the_transport_in_its_mode_at_each_exchange():
    """The engine's transport switches every rank between high-throughput exchanges (eager steps) and low-latency
    ones (graphed decode steps, their own smaller buffers); each exchange goes through the set of its mode."""
    from moeserve.distributed.ep.peer_to_peer import BufferSet, PeerBuffers, PeerToPeerRank, row_bytes, tables_of

    expert_map = ExpertMap.contiguous(EXPERTS, 2)
    row = row_bytes(token_format("bf16", torch.float32), HIDDEN, TOP_K)  # fp32 rows, unquantized
    sets = {}
    for low_latency, tokens in ((False, 8), (True, 4)):
        buffers = [PeerBuffers(2, tokens, row, HIDDEN, torch.float32, "cpu") for _ in range(2)]
        sets[low_latency] = [BufferSet(b, tables_of(buffers, "cpu")) for b in buffers]
    transports = [FakeTransport({mode: sets[mode][r] for mode in sets}) for r in range(2)]
    ranks = [PeerToPeerRank(expert_map, r, "bf16", t, "cpu", torch.float32) for r, t in enumerate(transports)]
    generator = torch.Generator().manual_seed(5)
    for low_latency, tokens_per_rank in ((False, (6, 3)), (True, (4, 1)), (False, (8, 0))):
        for transport in transports:
            transport.low_latency = low_latency
        xs = [torch.randn(t, HIDDEN, generator=generator) for t in tokens_per_rank]
        routes = [routing(x.shape[0], "random", generator) for x in xs]
        sendings = [rank.send_counts(x, ids, weights) for rank, x, (ids, weights) in zip(ranks, xs, routes)]
        for rank, sending in zip(ranks, sendings):
            rank.send_rows(sending)
        received = [rank.receive(sending) for rank, sending in zip(ranks, sendings)]
        if low_latency:  # fixed regions of the low-latency set
            assert all(layout.slots.shape[0] == 2 * 4 for _, layout, _ in received)
            received = [real_rows(*r, rank) for rank, r in enumerate(received)]
        check_received(received, routes, list(tokens_per_rank), expert_map, 2)
        combine_and_check(RanksOf(ranks), received, xs, routes, expert_map, "bf16")
    assert [call[3] for call in transports[0].calls] == [False, True, False]


def test_auto_takes_p2p_for_cuda_ranks_of_one_node_and_all_to_all_elsewhere(monkeypatch):
    from moeserve.distributed.parallelize import resolve_ep_backend

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_ep_backend("auto", "cuda:0", 8) == "p2p"
    assert resolve_ep_backend("auto", "cpu", 8) == "all_to_all"
    assert resolve_ep_backend("auto", "cuda:0", 1) == "all_to_all"  # no exchange at all
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 8 EP ranks over two nodes of 4
    assert resolve_ep_backend("auto", "cuda:0", 8) == "all_to_all"
    assert resolve_ep_backend("auto", "cuda:0", 4) == "p2p"
    assert resolve_ep_backend("allgather", "cuda:0", 4) == "allgather"  # named: as named


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_the_moe_layers_of_two_ranks_take_turns_through_the_p2p_transport(micro_batches, monkeypatch):
    """Two EP ranks' MoE layers (half the experts each, a virtual rank as dispatcher) run their stages in turn, as two
    processes would (with two-batch overlap: each rank's two micro-batches in turn, each through its own buffers):
    their experts write straight into the results areas, and each rank's output (shared expert included) equals one
    device's MoE over its tokens."""
    from torch import nn

    from moeserve.config import MoEConfig
    from moeserve.distributed.ep.peer_to_peer import PeerToPeerRank
    from moeserve.layers.moe.moe import MoE
    from moeserve.layers.stages import take_turns

    torch.manual_seed(3)
    config = MoEConfig(num_experts=8, top_k=3, intermediate_size=32, scoring="softmax", renormalize=True,
                       shared_intermediate_size=48)
    whole = MoE(64, config)
    for p in whole.parameters():
        nn.init.normal_(p, std=0.1)
    group = VirtualRanks(ExpertMap.contiguous(8, 2), "bf16", 64, 3, max_tokens=16, device="cpu", dtype=torch.float32,
                         micro_batches=micro_batches)
    layers = []
    for rank in range(2):
        layer = MoE(64, config)
        layer.load_state_dict(whole.state_dict())
        local = slice(4 * rank, 4 * rank + 4)
        layer.experts.gate_up_proj = nn.Parameter(whole.experts.gate_up_proj[local].clone())
        layer.experts.down_proj = nn.Parameter(whole.experts.down_proj[local].clone())
        layer.experts.num_experts = 4
        layer.dispatcher = group.ranks[rank]
        layers.append(layer)
    stored = []

    def store_results(self, y, handle):  # the experts wrote there: nothing is copied
        stored.append(y.data_ptr() == self.results_buffer(handle).data_ptr())
        return original(self, y, handle)

    original = PeerToPeerRank.store_results
    monkeypatch.setattr(PeerToPeerRank, "store_results", store_results)
    xs = [torch.randn(5, 64), torch.randn(11, 64)]
    parts = [x.tensor_split(micro_batches) for x in xs]  # by rank, then micro-batch
    with torch.no_grad():
        outs = take_turns(*(layer.stages(part[m], m) for m in range(micro_batches)
                            for layer, part in zip(layers, parts)))
        for rank, x in enumerate(xs):
            out = torch.cat(outs[rank::2])
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, whole(x), rtol=1e-5, atol=1e-5)
    assert stored == [True] * 2 * micro_batches


@pytest.mark.parametrize("hidden", [384, 1536])  # one partial chunk of values; a whole one and a partial one
@pytest.mark.parametrize("low_latency", [False, True], ids=["high-throughput", "low-latency"])
@pytest.mark.parametrize("budget", [None, 2])
def test_pull_results_sums_each_tokens_rows_where_its_ranks_hold_them(hidden, low_latency, budget):
    """The combine's get: token t's result at rank d lies at row first[d] (low latency: this rank's region) +
    local_index[t, d] of d's results area; the sum over the ranks it went to, in rank order (a token sent nowhere: 0);
    on an SM budget the programs loop over the tokens."""
    from moeserve.distributed.ep.peer_to_peer import address_table
    from moeserve.kernels.ep_transport import pull_results

    generator = torch.Generator().manual_seed(hidden + low_latency)
    ranks, tokens, region, me = 3, 9, 16, 1
    areas = [torch.randn(ranks * region, hidden, generator=generator) for _ in range(ranks)]
    table = address_table([a.data_ptr() for a in areas], "cpu")
    sent = torch.rand(tokens, ranks, generator=generator) < 0.6
    sent[0] = False  # a token with no expert anywhere
    local_index = torch.where(sent, sent.int().cumsum(dim=0) - 1, -1).to(torch.int32)
    first = None if low_latency else torch.tensor([5, 0, 7], dtype=torch.int32)
    out = torch.full((tokens, hidden), float("nan"))
    pull_results(table, local_index, first, out, me, region if low_latency else None, budget)
    expected = torch.zeros(tokens, hidden)
    for t, d in sent.nonzero().tolist():
        start = me * region if low_latency else int(first[d])
        expected[t] += areas[d][start + int(local_index[t, d])]
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="either first"):
        pull_results(table, local_index, torch.zeros(ranks, dtype=torch.int32), out, me, region)


def measure_p2p_on_one_cpu_rank(rank, world):
    """bench ep's measure_point for the p2p backends on one CPU rank: a transport of plain buffers in place of symmetric
    memory, "graphs" that run eagerly."""
    import torch.distributed as dist

    from moeserve.bench import ep as bench_ep
    from moeserve.distributed.ep.peer_to_peer import BufferSet, PeerBuffers, tables_of

    class OneRankTransport(Transport):
        def __init__(self, group, ep, max_tokens, low_latency_tokens=None, comm_sms=None):
            self.max_tokens, self.comm_sms, self.sets = max(max_tokens, low_latency_tokens or 0), comm_sms, {}

        def buffer_set(self, micro_batch, row_bytes, hidden, dtype, device):
            if self.low_latency not in self.sets:
                buffers = PeerBuffers(1, self.max_tokens, row_bytes, hidden, dtype, device)
                self.sets[self.low_latency] = BufferSet(buffers, tables_of([buffers], device))
            return self.sets[self.low_latency]

    bench_ep.PeerTransport = OneRankTransport
    bench_ep.graph_of = lambda fn: fn
    group = dist.group.WORLD
    return {(backend, fmt, budget): bench_ep.measure_point(7, HIDDEN, TOP_K, EXPERTS, fmt, backend, torch.device("cpu"),
                                                           group, group, iterations=2, comm_sms=budget)
            for backend in ("p2p", "p2p-ll") for fmt in ("bf16", "fp8") for budget in (None, 2)}


def test_bench_ep_measures_the_p2p_backends_end_to_end_on_one_rank():
    """What a multi-GPU bench ep runs for p2p and p2p-ll (buffers, the experts' output written into the results area,
    the graphed exchange, the bytes, the yardstick), every format and SM budget, on one CPU rank."""
    from tests.distributed.harness import run_ranks

    points = run_ranks(1, measure_p2p_on_one_cpu_rank)[0]
    assert len(points) == 8
    for point in points.values():
        assert point.dispatch_us > 0 and point.combine_us > 0 and point.yardstick_us > 0
        assert point.dispatch_bytes == point.combine_bytes == 0  # one rank: nothing crosses


@triton.jit
def _e2m1_codes_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _e2m1_codes(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


def test_the_puts_e2m1_codes_equal_the_formats_next_to_every_midpoint_and_at_the_edges():
    """The put's E2M1 codes (rounding 2m below 2, one mantissa bit from 2 on) against moeserve.quant.nvfp4's compares:
    every midpoint and the 16 fp32 values on each side of it, both signs; zeros, subnormals, the largest floats,
    infinities, NaNs of both signs; and random bit patterns."""
    from moeserve.quant.nvfp4 import e2m1_codes

    points = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.0, 2.5, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0]).view(torch.int32)
    near = (points[:, None] + torch.arange(-16, 17)).flatten()
    edges = torch.tensor([0, 1, 2, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FC00000,
                          0x7FFFFFFF], dtype=torch.int32)
    bits = torch.cat((near, edges, torch.randint(0, 2**31 - 1, (4096,), generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.int32)))
    x = torch.cat((bits, bits | -2**31)).view(torch.float32)  # both signs
    out = torch.empty(x.shape, dtype=torch.int32)
    _e2m1_codes_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    assert torch.equal(out, e2m1_codes(x).to(torch.int32))
