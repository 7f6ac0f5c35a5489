"""The grouped-GEMM layout: (row, k) pairs grouped by expert, each expert's share padded to whole
M blocks, computed on the device with torch ops and no host sync.

By default the layout has a fixed worst-case size (R*K + E*(block_m - 1) slots, rounded up to a block):
the GEMM grid does not depend on the routing, which CUDA graphs need (decode); blocks past
`num_padded` exit at once. `compact=True` reads the used size back (one sync) for prefill.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SINGLE_PROGRAM_MAX_ROWS = 64  # one program lays out a chunk of pairs; more pairs take one program per chunk
KERNEL_MAX_EXPERTS = 256
CHUNK = 64  # (row, k) pairs per program


@dataclass
class BlockLayout:
    sorted_rows: torch.Tensor  # [capacity] int32: flat (row * K + k) index per slot; num_rows marks padding
    block_expert: torch.Tensor  # [capacity / block_m] int32: the local expert of each M block (-1: unused)
    num_padded: torch.Tensor  # [1] int32: slots in use
    counts: torch.Tensor  # [E] int64: rows per expert
    num_rows: int  # R * K
    block_m: int


def block_layout(slots: torch.Tensor, num_experts: int, block_m: int, compact: bool = False) -> BlockLayout:
    """slots [R, K]: each row's local expert per k, -1 where none. On CUDA, worst-case layouts come from
    Triton: one program up to SINGLE_PROGRAM_MAX_ROWS pairs, three kernels of a program per CHUNK pairs
    beyond; compact layouts and the CPU from torch (`block_layout_reference`)."""
    if slots.is_cuda and not compact and 0 < num_experts <= KERNEL_MAX_EXPERTS:
        if slots.numel() <= SINGLE_PROGRAM_MAX_ROWS:
            return block_layout_single_program(slots, num_experts, block_m)
        return block_layout_chunked(slots, num_experts, block_m)
    return block_layout_reference(slots, num_experts, block_m, compact)


def worst_case_capacity(num_rows: int, num_experts: int, block_m: int) -> int:
    return -(-(num_rows + num_experts * (block_m - 1)) // block_m) * block_m


def block_layout_reference(slots: torch.Tensor, num_experts: int, block_m: int, compact: bool = False) -> BlockLayout:
    flat = slots.flatten().long()
    num_rows = flat.numel()
    key = torch.where(flat >= 0, flat, num_experts)  # rows for no expert here sort last and are dropped
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    first_of_key = counts.cumsum(0) - counts
    position = torch.arange(num_rows, device=flat.device) - first_of_key[sorted_key]
    if compact:
        capacity = int(ends[-1]) if num_experts else 0
    else:
        capacity = worst_case_capacity(num_rows, num_experts, block_m)
    dropped = sorted_key == num_experts
    destination = torch.where(dropped, capacity, starts[sorted_key.clamp(max=num_experts - 1)] + position)
    sorted_rows = torch.full((capacity + 1,), num_rows, dtype=torch.int32, device=flat.device)
    sorted_rows[destination] = order.to(torch.int32)
    block_start = torch.arange(0, capacity, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = torch.where(block_start < ends[-1], block_expert, -1).to(torch.int32)
    return BlockLayout(sorted_rows[:capacity], block_expert, ends[-1:].to(torch.int32), counts[:num_experts],
                       num_rows, block_m)


@triton.jit
def _one_hot(slots_ptr, start, num_rows, CHUNK: tl.constexpr, EXPERTS: tl.constexpr):
    """[CHUNK, EXPERTS] int32: entry (i, e) is 1 when pair start + i goes to local expert e."""
    offs = start + tl.arange(0, CHUNK)
    expert = tl.load(slots_ptr + offs, mask=offs < num_rows, other=-1)
    return (expert[:, None] == tl.arange(0, EXPERTS)[None, :]).to(tl.int32), offs


@triton.jit(do_not_specialize=["num_rows", "capacity", "num_blocks"])  # these vary from step to step
def _block_layout_kernel(slots_ptr, sorted_rows_ptr, block_expert_ptr, num_padded_ptr, counts_ptr, num_rows,
                         num_experts, capacity, num_blocks, BLOCK_M: tl.constexpr, EXPERTS: tl.constexpr,
                         CHUNK: tl.constexpr, FILL: tl.constexpr):
    counts = tl.zeros((EXPERTS,), dtype=tl.int32)
    for start in range(0, num_rows, CHUNK):
        hot, _ = _one_hot(slots_ptr, start, num_rows, CHUNK, EXPERTS)
        counts += tl.sum(hot, axis=0)
    padded, ends, total = _store_expert_ranges(counts, counts_ptr, num_padded_ptr, num_experts, BLOCK_M, EXPERTS)
    for start in range(0, capacity, FILL):  # every slot starts as padding (index num_rows)
        offs = start + tl.arange(0, FILL)
        tl.store(sorted_rows_ptr + offs, tl.full((FILL,), 0, tl.int32) + num_rows, mask=offs < capacity)
    tl.debug_barrier()  # the padding is written before any thread scatters a pair over it
    next_free = ends - padded  # per expert: the slot its next pair takes
    for start in range(0, num_rows, CHUNK):
        hot, offs = _one_hot(slots_ptr, start, num_rows, CHUNK, EXPERTS)
        earlier_in_chunk = tl.cumsum(hot, axis=0) - hot  # pairs of the same expert before this one
        destination = tl.sum(hot * (next_free[None, :] + earlier_in_chunk), axis=1)
        tl.store(sorted_rows_ptr + destination, offs.to(tl.int32), mask=tl.sum(hot, axis=1) > 0)
        next_free += tl.sum(hot, axis=0)
    _store_block_experts(block_expert_ptr, ends, total, num_blocks, BLOCK_M, CHUNK)


@triton.jit
def _store_expert_ranges(counts, counts_ptr, num_padded_ptr, num_experts, BLOCK_M: tl.constexpr,
                         EXPERTS: tl.constexpr):
    """Per expert its pairs padded to whole blocks and where its range ends; stores the counts and the total."""
    experts = tl.arange(0, EXPERTS)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    tl.store(counts_ptr + experts, counts.to(tl.int64), mask=experts < num_experts)
    tl.store(num_padded_ptr, total)
    return padded, ends, total


@triton.jit
def _store_block_experts(block_expert_ptr, ends, total, num_blocks, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    for start in range(0, num_blocks, CHUNK):  # a block's expert: how many experts end at or before it
        block = start + tl.arange(0, CHUNK)
        first_slot = block * BLOCK_M
        expert = tl.sum((ends[None, :] <= first_slot[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + block, tl.where(first_slot < total, expert, -1), mask=block < num_blocks)


def block_layout_single_program(slots: torch.Tensor, num_experts: int, block_m: int) -> BlockLayout:
    """The worst-case layout of `block_layout_reference`, from one program: no sort, no host sync."""
    flat = slots.flatten().contiguous()  # int32 or int64: the kernel compares; a top-k column view is copied
    num_rows = flat.numel()
    capacity = worst_case_capacity(num_rows, num_experts, block_m)
    sorted_rows = torch.empty(capacity, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(capacity // block_m, dtype=torch.int32, device=flat.device)
    num_padded = torch.empty(1, dtype=torch.int32, device=flat.device)
    counts = torch.empty(num_experts, dtype=torch.long, device=flat.device)
    _block_layout_kernel[(1,)](flat, sorted_rows, block_expert, num_padded, counts, num_rows, num_experts, capacity,
                               capacity // block_m, BLOCK_M=block_m, EXPERTS=triton.next_power_of_2(num_experts),
                               CHUNK=CHUNK, FILL=1024, num_warps=4)
    return BlockLayout(sorted_rows, block_expert, num_padded, counts, num_rows, block_m)


@triton.jit(do_not_specialize=["num_rows", "capacity", "slots_per_program"])  # these vary from step to step
def _chunk_counts_kernel(slots_ptr, chunk_counts_ptr, sorted_rows_ptr, num_rows, capacity, slots_per_program,
                         EXPERTS: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr):
    """Program c: the pairs of chunk c per expert, and its share of the slots set to padding (num_rows)."""
    chunk = tl.program_id(0)
    hot, _ = _one_hot(slots_ptr, chunk * CHUNK, num_rows, CHUNK, EXPERTS)
    tl.store(chunk_counts_ptr + chunk * EXPERTS + tl.arange(0, EXPERTS), tl.sum(hot, axis=0))
    first = chunk * slots_per_program
    for start in range(first, first + slots_per_program, FILL):
        offs = start + tl.arange(0, FILL)
        tl.store(sorted_rows_ptr + offs, tl.full((FILL,), 0, tl.int32) + num_rows,
                 mask=(offs < capacity) & (offs < first + slots_per_program))


@triton.jit(do_not_specialize=["num_chunks", "num_blocks"])  # these vary from step to step
def _chunk_bases_kernel(chunk_counts_ptr, chunk_base_ptr, block_expert_ptr, num_padded_ptr, counts_ptr, num_chunks,
                        num_experts, num_blocks, BLOCK_M: tl.constexpr, EXPERTS: tl.constexpr, TILE: tl.constexpr,
                        BLOCKS: tl.constexpr):
    """One program: per expert its pairs and padded range, then each chunk's first slot per expert."""
    experts = tl.arange(0, EXPERTS)
    counts = tl.zeros((EXPERTS,), dtype=tl.int32)
    for start in range(0, num_chunks, TILE):
        chunks = start + tl.arange(0, TILE)
        tile = tl.load(chunk_counts_ptr + chunks[:, None] * EXPERTS + experts[None, :], mask=chunks[:, None] < num_chunks,
                       other=0)
        counts += tl.sum(tile, axis=0)
    padded, ends, total = _store_expert_ranges(counts, counts_ptr, num_padded_ptr, num_experts, BLOCK_M, EXPERTS)
    next_free = ends - padded
    for start in range(0, num_chunks, TILE):
        chunks = start + tl.arange(0, TILE)
        inside = chunks[:, None] < num_chunks
        offsets = chunks[:, None] * EXPERTS + experts[None, :]
        tile = tl.load(chunk_counts_ptr + offsets, mask=inside, other=0)
        tl.store(chunk_base_ptr + offsets, next_free[None, :] + tl.cumsum(tile, axis=0) - tile, mask=inside)
        next_free += tl.sum(tile, axis=0)
    _store_block_experts(block_expert_ptr, ends, total, num_blocks, BLOCK_M, BLOCKS)


@triton.jit(do_not_specialize=["num_rows"])  # these vary from step to step
def _chunk_scatter_kernel(slots_ptr, chunk_base_ptr, sorted_rows_ptr, num_rows, EXPERTS: tl.constexpr,
                          CHUNK: tl.constexpr):
    """Program c: each pair of chunk c to its expert's next slot, in order."""
    chunk = tl.program_id(0)
    hot, offs = _one_hot(slots_ptr, chunk * CHUNK, num_rows, CHUNK, EXPERTS)
    base = tl.load(chunk_base_ptr + chunk * EXPERTS + tl.arange(0, EXPERTS))
    destination = tl.sum(hot * (base[None, :] + tl.cumsum(hot, axis=0) - hot), axis=1)
    tl.store(sorted_rows_ptr + destination, offs.to(tl.int32), mask=tl.sum(hot, axis=1) > 0)


def block_layout_chunked(slots: torch.Tensor, num_experts: int, block_m: int) -> BlockLayout:
    """The worst-case layout of `block_layout_reference` from three kernels: counts per chunk of pairs (and
    the padding), one program's prefix sums over chunks, then each chunk's scatter. No sort, no host sync."""
    flat = slots.flatten().contiguous()  # a view of the first k of sorted ids (Llama 4) has stride > 1
    num_rows = flat.numel()
    capacity = worst_case_capacity(num_rows, num_experts, block_m)
    num_chunks = max(1, triton.cdiv(num_rows, CHUNK))
    experts = triton.next_power_of_2(num_experts)
    sorted_rows = torch.empty(capacity, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(capacity // block_m, dtype=torch.int32, device=flat.device)
    num_padded = torch.empty(1, dtype=torch.int32, device=flat.device)
    counts = torch.empty(num_experts, dtype=torch.long, device=flat.device)
    chunk_counts = torch.empty(num_chunks, experts, dtype=torch.int32, device=flat.device)
    chunk_base = torch.empty(num_chunks, experts, dtype=torch.int32, device=flat.device)
    _chunk_counts_kernel[(num_chunks,)](flat, chunk_counts, sorted_rows, num_rows, capacity,
                                        triton.cdiv(capacity, num_chunks), EXPERTS=experts, CHUNK=CHUNK, FILL=1024,
                                        num_warps=4)
    _chunk_bases_kernel[(1,)](chunk_counts, chunk_base, block_expert, num_padded, counts, num_chunks, num_experts,
                              capacity // block_m, BLOCK_M=block_m, EXPERTS=experts, TILE=16, BLOCKS=64,
                              num_warps=4)
    _chunk_scatter_kernel[(num_chunks,)](flat, chunk_base, sorted_rows, num_rows, EXPERTS=experts, CHUNK=CHUNK,
                                         num_warps=4)
    return BlockLayout(sorted_rows, block_expert, num_padded, counts, num_rows, block_m)
