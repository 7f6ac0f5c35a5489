"""Expert-parallel dispatch and combine over peer memory (the p2p EP backend): every rank writes straight into its
peers' buffers (moeserve.kernels.ep_transport), so there is no collective and the
layout never leaves the device.

One exchange, per EP rank `me` with T tokens:
1. layout (device, `route_rows`): the ranks each token goes to (a token goes once to each rank holding one of its
   experts), its index among this rank's rows for each destination, the per-destination routing metadata, and this
   rank's row counts put into row `me` of every peer's [EP, EP] count matrix.
2. (all ranks have written their counts) each rank's rows for destination d go to d's receive area after the rows
   of the ranks before it: position = sum of counts[s][d] for s < me, plus the row's index. `put_rows` writes the
   payload (in the dispatch format) and the metadata for d: [payload | K local slots (int32, -1: not here) | K
   weights (fp32)], as the all-to-all dispatcher's rows.
3. (all rows written) the receiver reads how many rows came (the one host sync, to size its tensors) and hands
   them to the experts as they lie, grouped by source rank.
4. combine: `put_results` writes each received row's result into its source's [EP, max_tokens, H] area at
   (this rank, the row's index at its source); (all written) `sum_results` adds, for each token, the results of
   the ranks it went to.
Between the steps every rank must have finished the previous one: `barrier`. On one GPU with virtual ranks
(VirtualRanks) the ranks run each step in turn and no barrier is needed.

Limits: one exchange in flight per buffer set (a second dispatch before the combine would overwrite the rows the
experts read as views), and every rank must take the same mode at each step (their barriers and layouts differ).

Low-latency mode (decode): rank s's rows for d go to d's fixed region s (rows s * max_tokens onwards), so they need
no other rank's counts and go out with the counts in one step; the receiver hands on all EP * max_tokens rows, those
beyond each region's count with no experts (slots -1), and puts back only real rows. Every shape is fixed and nothing
waits on the host, so a decode step with it can be captured in a CUDA graph.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeserve.distributed.ep.dispatchers import ExpertParallelDispatcher
from moeserve.distributed.ep.token_formats import as_row_bytes, token_format
from moeserve.distributed.layout import ExpertMap
from moeserve.kernels import ep_transport
from moeserve.kernels.device import has_fp8
from moeserve.kernels.row_layout import RowLayout


@dataclass
class PeerTables:
    """The addresses (int64, on the device) of every EP rank's count matrix, receive area and combine area."""

    counts: torch.Tensor
    recv: torch.Tensor
    back: torch.Tensor


ROW_ALIGN = 64  # bytes: received rows start where the experts' GEMM loads them in 16-byte vectors (row strides
# of 16 elements, which Triton specializes on, for 4-byte values too)


def row_bytes(token_format, hidden: int, top_k: int) -> int:
    """Bytes of one received row: the token's payload in its format, then K int32 slots and K fp32 weights, padded
    to ROW_ALIGN."""
    return -(-(token_format.payload_bytes(hidden) + 8 * top_k) // ROW_ALIGN) * ROW_ALIGN


class PeerBuffers:
    """One rank's communication memory, allocated once for `max_tokens` tokens a rank:
    counts int32 [EP, EP]; recv uint8 [EP * max_tokens, row bytes] (worst case: every rank sends me all its tokens);
    back [EP, max_tokens, H] in the activation dtype (each rank's results for my rows). Beside them, the source rank
    and the index there of each receive row in low-latency mode's fixed regions (constants, made once)."""

    def __init__(self, ep: int, max_tokens: int, row_bytes: int, hidden: int, dtype: torch.dtype, device,
                 allocate=torch.empty):
        self.max_tokens = max_tokens
        self.counts = allocate((ep, ep), dtype=torch.int32, device=device).zero_()
        self.recv = allocate((ep * max_tokens, row_bytes), dtype=torch.uint8, device=device).zero_()
        self.back = allocate((ep, max_tokens, hidden), dtype=dtype, device=device).zero_()
        self.region_source = torch.arange(ep, dtype=torch.int32, device=device).repeat_interleave(max_tokens)
        self.region_index = torch.arange(max_tokens, dtype=torch.int32, device=device).repeat(ep)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.counts, self.recv, self.back))


def tables_of(buffers: list[PeerBuffers], device) -> PeerTables:
    """Address tables of buffers that one process can reach (virtual ranks on one device)."""
    def table(name):
        return torch.tensor([getattr(b, name).data_ptr() for b in buffers], dtype=torch.int64, device=device)
    return PeerTables(table("counts"), table("recv"), table("back"))


def symmetric_buffers(group, ep: int, max_tokens: int, row_bytes: int, hidden: int, dtype: torch.dtype, device,
                      barrier_timeout_ms: int = 60_000):
    """(PeerBuffers, PeerTables, barrier) of one rank of `group` in PyTorch's symmetric memory (CUDA backend): every
    rank's buffers mapped into every rank's address space, and a barrier on the device (release / acquire signals,
    ordered on the current stream: every put must be on that stream). A rank that never arrives (it failed) makes the
    others' barrier trap after barrier_timeout_ms instead of hanging. Collective: every rank of the group calls it.
    Not yet run on several GPUs."""
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    if dist.get_world_size(group) != ep:
        raise ValueError(f"symmetric buffers for {ep} EP ranks need a group of {ep}, got {dist.get_world_size(group)}")

    def allocate(shape, dtype, device):
        return symm_mem.empty(*shape, dtype=dtype, device=device)

    buffers = PeerBuffers(ep, max_tokens, row_bytes, hidden, dtype, device, allocate)
    handles = {name: symm_mem.rendezvous(getattr(buffers, name), group) for name in ("counts", "recv", "back")}
    # buffer_ptrs are each rank's allocation base; the tensor may start `offset` bytes into it
    tables = PeerTables(*(torch.tensor([p + getattr(handles[name], "offset", 0) for p in handles[name].buffer_ptrs],
                                       dtype=torch.int64, device=device) for name in ("counts", "recv", "back")))
    torch.cuda.synchronize(device)  # the zeroed buffers, before any peer writes into them

    def barrier():
        handles["counts"].barrier(channel=0, timeout_ms=barrier_timeout_ms)

    barrier()

    return buffers, tables, barrier


class PeerTransport:
    """One EP group's buffers in symmetric memory, shared by every MoE layer of a rank: a set for high-throughput
    exchanges sized for `max_tokens` a rank and, with `low_latency_tokens`, a set for low-latency ones (decode steps
    under CUDA graphs) sized for that many. Each set is made at its first use or by `prepare` (collective: every rank
    reaches it at the same point). `low_latency` is the mode of the exchanges to come; every rank of the group must
    set it alike before each forward."""

    def __init__(self, group, ep: int, max_tokens: int, timeout_seconds: float = 300.0,
                 low_latency_tokens: int | None = None):
        self.group, self.ep, self.max_tokens, self.timeout_seconds = group, ep, max_tokens, timeout_seconds
        self.low_latency_tokens = low_latency_tokens
        self.low_latency = False
        self.made = {}  # low_latency -> (PeerBuffers, PeerTables, barrier)

    def get(self, row_bytes: int, hidden: int, dtype: torch.dtype, device):
        """(PeerBuffers, PeerTables, barrier) of the current mode."""
        if self.low_latency and self.low_latency_tokens is None:
            raise RuntimeError("this transport has no low-latency buffers (made without low_latency_tokens)")
        if self.low_latency not in self.made:
            tokens = self.low_latency_tokens if self.low_latency else self.max_tokens
            self.made[self.low_latency] = symmetric_buffers(self.group, self.ep, tokens, row_bytes, hidden, dtype,
                                                            device, int(self.timeout_seconds * 1000))
        return self.made[self.low_latency]

    def prepare(self, row_bytes: int, hidden: int, dtype: torch.dtype, device) -> None:
        """Make every set now (before the KV cache takes the memory they need)."""
        mode = self.low_latency
        for self.low_latency in (False, True) if self.low_latency_tokens else (False,):
            self.get(row_bytes, hidden, dtype, device)
        self.low_latency = mode


@dataclass
class PeerHandle:
    local_index: torch.Tensor  # int32 [T, EP]: each token's row index among this rank's rows to each rank, -1: none
    source: torch.Tensor  # int32 [R]: the rank each received row came from
    index_at_source: torch.Tensor  # int32 [R]: its index among that rank's rows to this one (-1: no row, low latency)
    num_tokens: int
    dtype: torch.dtype


class PeerToPeerRank(ExpertParallelDispatcher):
    """One EP rank's side of the exchange, step by step (the module docstring); `dispatch` / `combine` run the steps
    with `barrier` between them."""

    def __init__(self, expert_map: ExpertMap, ep_rank: int, dispatch_format: str, buffers: PeerBuffers,
                 tables: PeerTables, device, dtype, barrier=lambda: None, fuse_quantization: bool | None = None,
                 low_latency: bool = False, fuse_layout: bool | None = None, transport=None):
        super().__init__(expert_map, None, ep_rank, dispatch_format, device, dtype)
        self.buffers, self.tables, self.barrier = buffers, tables, barrier
        self.transport = transport  # without buffers: they come from it at each exchange, in its mode
        self.fixed_mode = low_latency
        # FP8 / NVFP4 tokens quantized inside the put (default on CUDA with float8 types; elsewhere the torch format,
        # the spec, packs them)
        on_cuda = torch.device(device).type == "cuda"
        self.fuse_quantization = on_cuda and has_fp8(device) if fuse_quantization is None else fuse_quantization
        # the send side's layout in one kernel (default on CUDA; elsewhere the torch layout, its spec)
        self.fuse_layout = on_cuda if fuse_layout is None else fuse_layout
        self.pending = None

    @property
    def low_latency(self) -> bool:
        return self.transport.low_latency if self.transport is not None else self.fixed_mode

    def row_bytes(self, hidden: int, top_k: int) -> int:
        return row_bytes(self.format, hidden, top_k)

    def prepare_transport(self, hidden: int, top_k: int, dtype: torch.dtype, device) -> None:
        """The transport's buffers for tokens of `hidden` values routed to top_k experts, made now (collective)."""
        self.transport.prepare(self.row_bytes(hidden, top_k), hidden, dtype, device)

    def send_counts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        tokens, top_k = topk_ids.shape
        if self.transport is not None:
            self.buffers, self.tables, self.barrier = self.transport.get(self.row_bytes(x.shape[1], top_k), x.shape[1],
                                                                         x.dtype, x.device)
        self.check_fits(x, top_k)
        if self.fuse_layout:  # one kernel, counts put too
            local_index, meta = ep_transport.route_rows(topk_ids, topk_weights, self.replica_slots, self.replica_count,
                                                        self.slots_per_rank, self.ep_rank, self.tables.counts)
        else:
            local_index, meta, counts = self.layout(topk_ids, topk_weights)
            ep_transport.put_counts(self.tables.counts, counts, self.ep_rank)
        fused = self.format.name in ("fp8", "nvfp4") and self.fuse_quantization
        payload = x.contiguous() if fused else self.format.pack(x)
        self.pending = (payload, fused, meta, local_index, x.shape[1], top_k, x.dtype)

    def check_fits(self, x: torch.Tensor, top_k: int) -> None:
        """The exchange must match the buffers it writes into on every rank (else a put lands out of bounds)."""
        back = self.buffers.back
        if x.shape[0] > self.buffers.max_tokens:
            raise ValueError(f"{x.shape[0]} tokens on EP rank {self.ep_rank} exceed the transport's buffers "
                             f"({self.buffers.max_tokens} a rank): raise --ep-max-tokens-per-rank")
        if x.dtype != back.dtype or x.shape[1] != back.shape[2]:
            raise ValueError(f"tokens of {x.shape[1]} x {x.dtype} do not match the transport's buffers, made for "
                             f"{back.shape[2]} x {back.dtype}")
        needed = self.format.payload_bytes(x.shape[1]) + 8 * top_k
        if needed > self.buffers.recv.shape[1]:
            raise ValueError(f"rows of {needed} bytes (top-{top_k}) do not match the transport's receive rows of "
                             f"{self.buffers.recv.shape[1]}")

    def layout(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """(local_index int32 [T, EP], meta uint8 [T, EP, 8K], counts int32 [EP]) in torch: the spec of route_rows."""
        tokens, top_k = topk_ids.shape
        destination, local_slot = self.place(topk_ids)  # [T, K] each
        goes_to = F.one_hot(destination.long(), self.ep).amax(dim=1).bool()  # [T, EP]
        local_index = torch.where(goes_to, goes_to.int().cumsum(dim=0) - 1, -1).to(torch.int32)
        here = destination[:, None, :] == torch.arange(self.ep, device=topk_ids.device)[None, :, None]  # [T, EP, K]
        slots = torch.where(here, local_slot[:, None, :], -1).to(torch.int32).reshape(-1, top_k)
        weights = torch.where(here, topk_weights[:, None, :].float(), 0.0).reshape(-1, top_k)
        meta = torch.cat((as_row_bytes(slots), as_row_bytes(weights)), dim=1).view(tokens, self.ep, 8 * top_k)
        return local_index, meta, goes_to.sum(dim=0).to(torch.int32)

    def send_rows(self) -> None:
        payload, fused, meta, local_index, *_ = self.pending
        # low latency: my fixed region at every rank; else after the rows of the ranks before me
        placement = ep_transport.Placement(self.buffers.counts, self.ep_rank,
                                           self.buffers.max_tokens if self.low_latency else None)
        row = self.buffers.recv.shape[1]
        if fused:
            ep_transport.put_quantized_rows(self.format.name, payload, meta, local_index, self.tables.recv, row,
                                            placement)
        else:
            ep_transport.put_rows(payload, meta, local_index, self.tables.recv, row, placement)

    def receive(self):
        if self.low_latency:
            return self.receive_fixed_regions()
        *_, local_index, hidden, top_k, dtype = self.pending
        self.pending = None
        from_each = self.buffers.counts[:, self.ep_rank]  # [EP]
        total = int(from_each.sum())  # the host sync: how many rows to hand on
        rows = self.buffers.recv[:total]
        tokens, slots, weights = self.unpack_rows(rows, hidden, top_k, dtype)
        ranks = torch.arange(self.ep, device=rows.device, dtype=torch.int32)
        source = torch.repeat_interleave(ranks, from_each, output_size=total)
        first = torch.cumsum(from_each, dim=0) - from_each
        index_at_source = (torch.arange(total, device=rows.device) - first[source.long()]).to(torch.int32)
        return tokens, RowLayout(slots, weights), PeerHandle(local_index, source, index_at_source,
                                                             local_index.shape[0], dtype)

    def receive_fixed_regions(self):
        """Low-latency mode: all EP * max_tokens rows; those beyond a region's count get no experts and index -1."""
        *_, local_index, hidden, top_k, dtype = self.pending
        self.pending = None
        buffers = self.buffers
        tokens, slots, weights = self.unpack_rows(buffers.recv, hidden, top_k, dtype)
        index = buffers.region_index  # [EP * max_tokens]
        real = index < buffers.counts[:, self.ep_rank].repeat_interleave(buffers.max_tokens)
        slots = torch.where(real[:, None], slots, -1)
        weights = torch.where(real[:, None], weights, 0.0)
        handle = PeerHandle(local_index, buffers.region_source, torch.where(real, index, -1), local_index.shape[0],
                            dtype)
        return tokens, RowLayout(slots, weights), handle

    def send_results(self, y: torch.Tensor, handle: PeerHandle) -> None:
        ep_transport.put_results(y.to(handle.dtype), handle.source, handle.index_at_source,
                                 self.tables.back, self.ep_rank, self.buffers.max_tokens)

    def sum_results(self, handle: PeerHandle) -> torch.Tensor:
        out = torch.empty(handle.num_tokens, self.buffers.back.shape[2], dtype=handle.dtype,
                          device=self.buffers.back.device)
        ep_transport.sum_results(self.buffers.back, handle.local_index, out)
        return out

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        self.send_counts(x, topk_ids, topk_weights)
        if not self.low_latency:  # rows wait for every rank's counts
            self.barrier()
        self.send_rows()
        self.barrier()
        return self.receive()

    def combine(self, y: torch.Tensor, handle: PeerHandle) -> torch.Tensor:
        self.send_results(y, handle)
        self.barrier()
        return self.sum_results(handle)


class VirtualRanks:
    """EP ranks 0..R-1 in one process on one device: R buffers, one address table, each step run for every rank
    in turn (so a step sees every rank's previous step done). Tests and benchmarks of the transport without
    several GPUs."""

    def __init__(self, expert_map: ExpertMap, dispatch_format: str, hidden: int, top_k: int, max_tokens: int,
                 device, dtype=torch.bfloat16, fuse_quantization: bool | None = None, low_latency: bool = False,
                 fuse_layout: bool | None = None):
        ep = expert_map.num_ranks
        row = row_bytes(token_format(dispatch_format, dtype), hidden, top_k)
        self.buffers = [PeerBuffers(ep, max_tokens, row, hidden, dtype, device) for _ in range(ep)]
        tables = tables_of(self.buffers, device)
        self.ranks = [PeerToPeerRank(expert_map, r, dispatch_format, self.buffers[r], tables, device, dtype,
                                     fuse_quantization=fuse_quantization, low_latency=low_latency,
                                     fuse_layout=fuse_layout) for r in range(ep)]

    def dispatch(self, xs, topk_ids, topk_weights) -> list:
        """Per rank: (tokens, RowLayout, handle), as each rank's dispatch returns them."""
        for rank, x, ids, weights in zip(self.ranks, xs, topk_ids, topk_weights):
            rank.send_counts(x, ids, weights)
        for rank in self.ranks:
            rank.send_rows()
        return [rank.receive() for rank in self.ranks]

    def combine(self, ys, handles) -> list[torch.Tensor]:
        for rank, y, handle in zip(self.ranks, ys, handles):
            rank.send_results(y, handle)
        return [rank.sum_results(handle) for rank, handle in zip(self.ranks, handles)]
