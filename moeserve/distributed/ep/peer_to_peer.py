"""Expert-parallel dispatch and combine over peer memory (the p2p EP backend): every rank writes its tokens straight
into its peers' buffers and reads its results straight from theirs (moeserve.kernels.ep_transport), so there is no
collective and the layout never leaves the device.

One exchange, per EP rank `me` with T tokens:
1. layout (device, `route_rows`): the ranks each token goes to (a token goes once to each rank holding one of its
   experts), its index among this rank's rows for each destination, the per-destination routing metadata, and this
   rank's row counts put into row `me` of every peer's [EP, EP] count matrix.
2. (all ranks have written their counts) each rank's rows for destination d go to d's receive area after the rows
   of the ranks before it: position = sum of counts[s][d] for s < me, plus the row's index. `put_rows` writes the
   payload (in the dispatch format) and the metadata for d: [payload | K local slots (int32, -1: not here) | K
   weights (fp32)], as the all-to-all dispatcher's rows.
3. (all rows written) the receiver reads how many rows came (the one host sync, to size its tensors), notes where its
   own rows start in every rank's area (`first`: the counts matrix is overwritten by the next exchange's counts), and
   hands the rows to the experts as they lie, grouped by source rank.
4. combine: the experts write each received row's result into the receiver's results area, row for row as received
   (`results_buffer`; a result made elsewhere is copied there); (all written) `pull_results` reads, for each token,
   its result from every rank it went to, at the row its dispatch put it in there, and adds them. Each result moves
   once, straight from where the experts wrote it into the token's sum: no second copy at the source.
Between the steps every rank must have finished the previous one: `barrier`. On one GPU with virtual ranks
(VirtualRanks) the ranks run each step in turn and no barrier is needed.

Limits: one exchange in flight per buffer set (a second dispatch before the combine would overwrite the rows the
experts read as views), and every rank must take the same mode at each step (their barriers and layouts differ).

Low-latency mode (decode): rank s's rows for d go to d's fixed region s (rows s * max_tokens onwards), so they need
no other rank's counts and go out with the counts in one step; the receiver hands on all EP * max_tokens rows, those
beyond each region's count with no experts (slots -1), and its sources read back only real rows. Every shape is
fixed and nothing waits on the host, so a decode step with it can be captured in a CUDA graph.
"""

import contextlib
from collections.abc import Callable
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
    """The addresses (int64, on the device) of every EP rank's count matrix, receive area and results area."""

    counts: torch.Tensor
    recv: torch.Tensor
    results: torch.Tensor


ROW_ALIGN = 64  # bytes: received rows start where the experts' GEMM loads them in 16-byte vectors (row strides
# of 16 elements, which Triton specializes on, for 4-byte values too)


def row_bytes(token_format, hidden: int, top_k: int) -> int:
    """Bytes of one received row: the token's payload in its format, then K int32 slots and K fp32 weights, padded
    to ROW_ALIGN."""
    return -(-(token_format.payload_bytes(hidden) + 8 * top_k) // ROW_ALIGN) * ROW_ALIGN


class PeerBuffers:
    """One rank's communication memory, allocated once for `max_tokens` tokens a rank:
    counts int32 [EP, EP]; recv uint8 [EP * max_tokens, row bytes] (worst case: every rank sends me all its tokens);
    results [EP * max_tokens, H] in the activation dtype (my experts' result for each receive row, which its source
    reads). Beside them, the index at its source of each receive row in low-latency mode's fixed regions (a constant,
    made once)."""

    def __init__(self, ep: int, max_tokens: int, row_bytes: int, hidden: int, dtype: torch.dtype, device,
                 allocate=torch.empty):
        self.max_tokens = max_tokens
        self.counts = allocate((ep, ep), dtype=torch.int32, device=device).zero_()
        self.recv = allocate((ep * max_tokens, row_bytes), dtype=torch.uint8, device=device).zero_()
        self.results = allocate((ep * max_tokens, hidden), dtype=dtype, device=device).zero_()
        self.region_index = torch.arange(max_tokens, dtype=torch.int32, device=device).repeat(ep)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.counts, self.recv, self.results))


def address_table(addresses: list[int], device) -> torch.Tensor:
    """int64 addresses for the transport's kernels, which store 16 bytes at a time through them."""
    if any(a % 16 for a in addresses):
        raise ValueError(f"peer buffers must start on 16-byte boundaries, got addresses {[hex(a) for a in addresses]}")
    return torch.tensor(addresses, dtype=torch.int64, device=device)


def tables_of(buffers: list[PeerBuffers], device) -> PeerTables:
    """Address tables of buffers that one process can reach (virtual ranks on one device)."""
    def table(name):
        return address_table([getattr(b, name).data_ptr() for b in buffers], device)
    return PeerTables(table("counts"), table("recv"), table("results"))


@dataclass
class BufferSet:
    """One exchange's memory: this rank's buffers, every rank's addresses, and the barrier between the steps."""

    buffers: PeerBuffers
    tables: PeerTables
    barrier: Callable[[], None] = lambda: None


def symmetric_buffers(group, ep: int, max_tokens: int, row_bytes: int, hidden: int, dtype: torch.dtype, device,
                      barrier_timeout_ms: int = 60_000) -> BufferSet:
    """The buffers of one rank of `group` in PyTorch's symmetric memory (CUDA backend): every rank's buffers mapped
    into every rank's address space, and a barrier on the device (release / acquire signals, ordered on the current
    stream: every put must be on that stream). A rank that never arrives (it failed) makes the others' barrier trap
    after barrier_timeout_ms instead of hanging. Collective: every rank of the group calls it. Run so far by processes
    sharing one GPU (tests/gpu/test_ep_engine_one_gpu.py), not yet across several GPUs."""
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    if dist.get_world_size(group) != ep:
        raise ValueError(f"symmetric buffers for {ep} EP ranks need a group of {ep}, got {dist.get_world_size(group)}")

    def allocate(shape, dtype, device):
        return symm_mem.empty(*shape, dtype=dtype, device=device)

    buffers = PeerBuffers(ep, max_tokens, row_bytes, hidden, dtype, device, allocate)
    handles = {name: symm_mem.rendezvous(getattr(buffers, name), group) for name in ("counts", "recv", "results")}
    # buffer_ptrs are each rank's allocation base; the tensor may start `offset` bytes into it
    tables = PeerTables(*(address_table([p + getattr(handles[name], "offset", 0) for p in handles[name].buffer_ptrs],
                                        device) for name in ("counts", "recv", "results")))
    torch.cuda.synchronize(device)  # the zeroed buffers, before any peer writes into them

    def barrier():
        handles["counts"].barrier(channel=0, timeout_ms=barrier_timeout_ms)

    barrier()
    return BufferSet(buffers, tables, barrier)


class Transport:
    """What a PeerToPeerRank takes its memory from at each exchange. `low_latency`: the mode of the exchanges to come,
    set alike on every rank before each forward. `comm_sms`: with a number, the puts run with at most that many
    programs (SMs) on a stream of their own, beside the model's compute (CUDA); so do the combine's gets."""

    low_latency = False
    comm_sms: int | None = None
    comm_stream = None

    def buffer_set(self, micro_batch: int, row_bytes: int, hidden: int, dtype: torch.dtype, device) -> BufferSet:
        raise NotImplementedError

    def stream(self, device):
        """The puts' stream: their own with comm_sms on CUDA, else the current one."""
        if self.comm_sms is None or torch.device(device).type != "cuda":
            return None
        if self.comm_stream is None:
            self.comm_stream = torch.cuda.Stream(device)
        return self.comm_stream


class GivenBuffers(Transport):
    """Buffer sets made by the caller, one per micro-batch (virtual ranks on one device: no barrier needed)."""

    def __init__(self, sets: list[BufferSet], low_latency: bool = False, comm_sms: int | None = None):
        self.sets, self.low_latency, self.comm_sms = sets, low_latency, comm_sms

    def buffer_set(self, micro_batch, row_bytes, hidden, dtype, device) -> BufferSet:
        return self.sets[micro_batch]


class PeerTransport(Transport):
    """One EP group's buffers in symmetric memory, shared by every MoE layer of a rank: for high-throughput exchanges
    a set per micro-batch (two-batch overlap keeps two exchanges in flight) sized for `max_tokens` a rank and, with
    `low_latency_tokens`, a set for low-latency ones (decode steps under CUDA graphs, one micro-batch) sized for that
    many. Each set is made at its first use or by `prepare` (collective: every rank reaches it at the same point)."""

    def __init__(self, group, ep: int, max_tokens: int, timeout_seconds: float = 300.0,
                 low_latency_tokens: int | None = None, micro_batches: int = 1, comm_sms: int | None = None):
        self.group, self.ep, self.max_tokens, self.timeout_seconds = group, ep, max_tokens, timeout_seconds
        self.low_latency_tokens, self.micro_batches, self.comm_sms = low_latency_tokens, micro_batches, comm_sms
        self.low_latency = False
        self.made = {}  # (low_latency, micro_batch) -> BufferSet

    def buffer_set(self, micro_batch, row_bytes, hidden, dtype, device) -> BufferSet:
        """The set of the current mode for this micro-batch."""
        if self.low_latency and self.low_latency_tokens is None:
            raise RuntimeError("this transport has no low-latency buffers (made without low_latency_tokens)")
        if micro_batch >= (1 if self.low_latency else self.micro_batches):
            mode = "low-latency" if self.low_latency else "high-throughput"
            raise RuntimeError(f"micro-batch {micro_batch} has no {mode} buffers in this transport (made for "
                               f"{self.micro_batches} micro-batches; low latency takes one)")
        key = (self.low_latency, micro_batch)
        if key not in self.made:
            tokens = self.low_latency_tokens if self.low_latency else self.max_tokens
            self.made[key] = symmetric_buffers(self.group, self.ep, tokens, row_bytes, hidden, dtype, device,
                                               int(self.timeout_seconds * 1000))
        return self.made[key]

    def prepare(self, row_bytes: int, hidden: int, dtype: torch.dtype, device) -> None:
        """Make every set now (before the KV cache takes the memory they need)."""
        mode = self.low_latency
        self.low_latency = False
        for micro_batch in range(self.micro_batches):
            self.buffer_set(micro_batch, row_bytes, hidden, dtype, device)
        if self.low_latency_tokens:
            self.low_latency = True
            self.buffer_set(0, row_bytes, hidden, dtype, device)
        self.low_latency = mode


@dataclass
class PeerHandle:
    local_index: torch.Tensor  # int32 [T, EP]: each token's row index among this rank's rows to each rank, -1: none
    first: torch.Tensor | None  # int32 [EP]: where this rank's rows start in each rank's area (None: low latency,
    # this rank's fixed region)
    received: int  # rows handed to the experts (low latency: all EP * max_tokens)
    num_tokens: int
    dtype: torch.dtype
    memory: BufferSet  # the exchange's buffers: its combine goes through them too


@dataclass
class Sending:
    """A dispatch between its halves: what the receive needs, held (with the tensors the puts read) until then."""

    memory: BufferSet
    low_latency: bool
    payload: torch.Tensor  # the tokens as the puts read them: x (quantized by the put) or their packed rows
    fused: bool
    meta: torch.Tensor
    local_index: torch.Tensor
    hidden: int
    top_k: int
    dtype: torch.dtype
    done: torch.cuda.Event | None = None  # the end of its puts on the transport's stream (None: inline)


class OnStream:
    """A block of work on `stream` after the current stream's work so far, or inline (stream None); `done` then marks
    its end, for the compute stream to wait for (`join`) where it needs the block's results."""

    def __init__(self, stream):
        self.stream, self.done, self.context = stream, None, contextlib.nullcontext()

    def __enter__(self) -> "OnStream":
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
            self.context = torch.cuda.stream(self.stream)
        self.context.__enter__()
        return self

    def __exit__(self, *exc):
        if self.stream is not None:
            self.done = torch.cuda.Event()
            self.done.record(self.stream)
        return self.context.__exit__(*exc)

    @staticmethod
    def join(done: torch.cuda.Event | None, device) -> None:
        """The current stream waits for the block (the tensors it read are still held by the caller, so none was
        freed and reused meanwhile)."""
        if done is not None:
            torch.cuda.current_stream(device).wait_event(done)


class PeerToPeerRank(ExpertParallelDispatcher):
    """One EP rank's side of the exchange, step by step (the module docstring). The halves: `dispatch_send` (layout,
    counts, puts) and `dispatch_recv` (the rows as the experts take them), `combine_send` (results stored) and
    `combine_recv` (each token's sum read from its ranks), so that other work runs while tokens travel; with the
    transport's comm_sms the puts and gets run on a stream of their own (the gets in combine_send). `micro_batch` picks
    the transport's buffer set: exchanges in flight at once each need their own."""

    def __init__(self, expert_map: ExpertMap, ep_rank: int, dispatch_format: str, transport: Transport, device,
                 dtype, fuse_quantization: bool | None = None, fuse_layout: bool | None = None):
        super().__init__(expert_map, None, ep_rank, dispatch_format, device, dtype)
        self.transport = transport
        # FP8 / NVFP4 tokens quantized inside the put (default on CUDA with float8 types; elsewhere the torch format,
        # the spec, packs them)
        on_cuda = torch.device(device).type == "cuda"
        self.fuse_quantization = on_cuda and has_fp8(device) if fuse_quantization is None else fuse_quantization
        # the send side's layout in one kernel (default on CUDA; elsewhere the torch layout, its spec)
        self.fuse_layout = on_cuda if fuse_layout is None else fuse_layout

    @property
    def low_latency(self) -> bool:
        return self.transport.low_latency

    def row_bytes(self, hidden: int, top_k: int) -> int:
        return row_bytes(self.format, hidden, top_k)

    def prepare_transport(self, hidden: int, top_k: int, dtype: torch.dtype, device) -> None:
        """The transport's buffers for tokens of `hidden` values routed to top_k experts, made now (collective)."""
        self.transport.prepare(self.row_bytes(hidden, top_k), hidden, dtype, device)

    # The steps

    def send_counts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    micro_batch: int = 0) -> Sending:
        """Layout, counts put into every peer's matrix."""
        top_k = topk_ids.shape[1]
        memory = self.transport.buffer_set(micro_batch, self.row_bytes(x.shape[1], top_k), x.shape[1], x.dtype,
                                           x.device)
        self.check_fits(memory.buffers, x, top_k)
        if self.fuse_layout:  # one kernel, counts put too
            local_index, meta = ep_transport.route_rows(topk_ids, topk_weights, self.replica_slots, self.replica_count,
                                                        self.slots_per_rank, self.ep_rank, memory.tables.counts)
        else:
            local_index, meta, counts = self.layout(topk_ids, topk_weights)
            ep_transport.put_counts(memory.tables.counts, counts, self.ep_rank)
        fused = self.format.name in ("fp8", "nvfp4") and self.fuse_quantization
        payload = x.contiguous() if fused else self.format.pack(x)
        return Sending(memory, self.low_latency, payload, fused, meta, local_index, x.shape[1], top_k, x.dtype)

    def check_fits(self, buffers: PeerBuffers, x: torch.Tensor, top_k: int) -> None:
        """The exchange must match the buffers it writes into on every rank (else a put lands out of bounds)."""
        results = buffers.results
        if x.shape[0] > buffers.max_tokens:
            raise ValueError(f"{x.shape[0]} tokens on EP rank {self.ep_rank} exceed the transport's buffers "
                             f"({buffers.max_tokens} a rank): raise --ep-max-tokens-per-rank")
        if x.dtype != results.dtype or x.shape[1] != results.shape[1]:
            raise ValueError(f"tokens of {x.shape[1]} x {x.dtype} do not match the transport's buffers, made for "
                             f"{results.shape[1]} x {results.dtype}")
        needed = self.format.payload_bytes(x.shape[1]) + 8 * top_k
        if needed > buffers.recv.shape[1]:
            raise ValueError(f"rows of {needed} bytes (top-{top_k}) do not match the transport's receive rows of "
                             f"{buffers.recv.shape[1]}")

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

    def send_rows(self, sending: Sending) -> None:
        buffers, tables = sending.memory.buffers, sending.memory.tables
        # low latency: my fixed region at every rank; else after the rows of the ranks before me
        placement = ep_transport.Placement(buffers.counts, self.ep_rank,
                                           buffers.max_tokens if sending.low_latency else None)
        row, budget = buffers.recv.shape[1], self.transport.comm_sms
        if sending.fused:
            ep_transport.put_quantized_rows(self.format.name, sending.payload, sending.meta, sending.local_index,
                                            tables.recv, row, placement, budget)
        else:
            ep_transport.put_rows(sending.payload, sending.meta, sending.local_index, tables.recv, row, placement,
                                  budget)

    def receive(self, sending: Sending):
        if sending.low_latency:
            return self.receive_fixed_regions(sending)
        buffers = sending.memory.buffers
        from_each = buffers.counts[:, self.ep_rank]  # [EP]
        total = int(from_each.sum())  # the host sync: how many rows to hand on
        rows = buffers.recv[:total]
        tokens, slots, weights = self.unpack_rows(rows, sending.hidden, sending.top_k, sending.dtype)
        first = buffers.counts[:self.ep_rank].sum(dim=0, dtype=torch.int32)  # my rows' start in each rank's area
        handle = PeerHandle(sending.local_index, first, total, sending.local_index.shape[0], sending.dtype,
                            sending.memory)
        return tokens, RowLayout(slots, weights), handle

    def receive_fixed_regions(self, sending: Sending):
        """Low-latency mode: all EP * max_tokens rows; those beyond a region's count get no experts (slots -1)."""
        buffers = sending.memory.buffers
        index = buffers.region_index  # [EP * max_tokens]
        real = index < buffers.counts[:, self.ep_rank].repeat_interleave(buffers.max_tokens)
        tokens, slots, weights = self.unpack_rows(buffers.recv, sending.hidden, sending.top_k, sending.dtype, real)
        slots = torch.where(real[:, None], slots, -1)
        weights = torch.where(real[:, None], weights, 0.0)
        handle = PeerHandle(sending.local_index, None, buffers.recv.shape[0], sending.local_index.shape[0],
                            sending.dtype, sending.memory)
        return tokens, RowLayout(slots, weights), handle

    def results_buffer(self, handle: PeerHandle) -> torch.Tensor:
        """Where the experts write the received rows' results ([rows received, H]), for their sources to read."""
        return handle.memory.buffers.results[:handle.received]

    def store_results(self, y: torch.Tensor, handle: PeerHandle) -> None:
        """The received rows' results into the results area, unless the experts wrote them there."""
        results = self.results_buffer(handle)
        if y.shape != results.shape:
            raise ValueError(f"the experts returned {tuple(y.shape)} results for {tuple(results.shape)} received rows")
        if y.data_ptr() != results.data_ptr():
            results.copy_(y)

    def empty_sums(self, handle: PeerHandle) -> torch.Tensor:
        results = handle.memory.buffers.results
        return torch.empty(handle.num_tokens, results.shape[1], dtype=handle.dtype, device=results.device)

    def pull_results(self, handle: PeerHandle, out: torch.Tensor | None = None) -> torch.Tensor:
        """Each token's results, read from the ranks it went to and summed (every rank's results stored)."""
        buffers = handle.memory.buffers
        out = self.empty_sums(handle) if out is None else out
        ep_transport.pull_results(handle.memory.tables.results, handle.local_index, handle.first, out, self.ep_rank,
                                  buffers.max_tokens if handle.first is None else None, self.transport.comm_sms)
        return out

    # The halves

    def dispatch_send(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                      micro_batch: int = 0) -> Sending:
        sending = self.send_counts(x, topk_ids, topk_weights, micro_batch)  # on the compute stream: what it makes
        # is freed there
        with OnStream(self.transport.stream(x.device)) as puts:
            if not sending.low_latency:  # rows wait for every rank's counts
                sending.memory.barrier()
            self.send_rows(sending)
            sending.memory.barrier()
        sending.done = puts.done
        return sending

    def dispatch_recv(self, sending: Sending):
        OnStream.join(sending.done, sending.payload.device)
        return self.receive(sending)

    def combine_send(self, y: torch.Tensor, handle: PeerHandle):
        """Stores the results; with a stream of its own, waits there for every rank's and reads this rank's sums
        beside the compute. Inline, the wait and the reads are combine_recv's: what runs between the halves (the
        shared expert) then fills the time the other ranks take to finish their experts."""
        self.store_results(y, handle)
        stream = self.transport.stream(y.device)
        if stream is None:
            return handle, None, None
        out = self.empty_sums(handle)  # made on the compute stream, which frees it after the join
        with OnStream(stream) as gets:
            handle.memory.barrier()  # every rank's results stored
            self.pull_results(handle, out)
        return handle, out, gets.done

    def combine_recv(self, sent) -> torch.Tensor:
        handle, out, done = sent  # the handle held until the join: the gets read its tensors
        if out is None:
            handle.memory.barrier()
            return self.pull_results(handle)
        OnStream.join(done, out.device)
        return out

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, micro_batch: int = 0):
        return self.dispatch_recv(self.dispatch_send(x, topk_ids, topk_weights, micro_batch))

    def combine(self, y: torch.Tensor, handle: PeerHandle) -> torch.Tensor:
        return self.combine_recv(self.combine_send(y, handle))


class VirtualRanks:
    """EP ranks 0..R-1 in one process on one device: R buffers (a set per micro-batch), one address table, each step
    run for every rank in turn (so a step sees every rank's previous step done). Tests and benchmarks of the
    transport without several GPUs."""

    def __init__(self, expert_map: ExpertMap, dispatch_format: str, hidden: int, top_k: int, max_tokens: int,
                 device, dtype=torch.bfloat16, fuse_quantization: bool | None = None, low_latency: bool = False,
                 fuse_layout: bool | None = None, micro_batches: int = 1, comm_sms: int | None = None):
        ep = expert_map.num_ranks
        row = row_bytes(token_format(dispatch_format, dtype), hidden, top_k)
        by_micro_batch = []
        for _ in range(micro_batches):
            buffers = [PeerBuffers(ep, max_tokens, row, hidden, dtype, device) for _ in range(ep)]
            by_micro_batch.append([BufferSet(b, tables_of(buffers, device)) for b in buffers])
        self.buffers = [sets[0].buffers for sets in zip(*by_micro_batch)]  # micro-batch 0's, by rank
        self.ranks = [PeerToPeerRank(expert_map, r, dispatch_format,
                                     GivenBuffers([sets[r] for sets in by_micro_batch], low_latency, comm_sms),
                                     device, dtype, fuse_quantization=fuse_quantization, fuse_layout=fuse_layout)
                      for r in range(ep)]

    def dispatch(self, xs, topk_ids, topk_weights, micro_batch: int = 0) -> list:
        """Per rank: (tokens, RowLayout, handle), as each rank's dispatch returns them."""
        sendings = [rank.send_counts(x, ids, weights, micro_batch)
                    for rank, x, ids, weights in zip(self.ranks, xs, topk_ids, topk_weights)]
        for rank, sending in zip(self.ranks, sendings):
            rank.send_rows(sending)
        return [rank.receive(sending) for rank, sending in zip(self.ranks, sendings)]

    def combine(self, ys, handles) -> list[torch.Tensor]:
        for rank, y, handle in zip(self.ranks, ys, handles):
            rank.store_results(y, handle)
        return [rank.pull_results(handle) for rank, handle in zip(self.ranks, handles)]
