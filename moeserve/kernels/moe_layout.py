"""The grouped-GEMM layout: (row, k) pairs grouped by expert, each expert's share padded to whole
M blocks, computed on the device with torch ops and no host sync.

By default the layout has a fixed worst-case size (R*K + E*(block_m - 1) slots, rounded up to a block):
the GEMM grid does not depend on the routing, which CUDA graphs need (decode); blocks past
`num_padded` exit at once. `compact=True` reads the used size back (one sync) for prefill.
"""

from dataclasses import dataclass

import torch


@dataclass
class BlockLayout:
    sorted_rows: torch.Tensor  # [capacity] int32: flat (row * K + k) index per slot; num_rows marks padding
    block_expert: torch.Tensor  # [capacity / block_m] int32: the local expert of each M block (-1: unused)
    num_padded: torch.Tensor  # [1] int32: slots in use
    counts: torch.Tensor  # [E] int64: rows per expert
    num_rows: int  # R * K
    block_m: int


def block_layout(slots: torch.Tensor, num_experts: int, block_m: int, compact: bool = False) -> BlockLayout:
    """slots [R, K]: each row's local expert per k, -1 where none."""
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
        capacity = -(-(num_rows + num_experts * (block_m - 1)) // block_m) * block_m
    dropped = sorted_key == num_experts
    destination = torch.where(dropped, capacity, starts[sorted_key.clamp(max=num_experts - 1)] + position)
    sorted_rows = torch.full((capacity + 1,), num_rows, dtype=torch.int32, device=flat.device)
    sorted_rows[destination] = order.to(torch.int32)
    block_start = torch.arange(0, capacity, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = torch.where(block_start < ends[-1], block_expert, -1).to(torch.int32)
    return BlockLayout(sorted_rows[:capacity], block_expert, ends[-1:].to(torch.int32), counts[:num_experts],
                       num_rows, block_m)
