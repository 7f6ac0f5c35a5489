"""The Triton block layouts (one program; three kernels over chunks of pairs) against the torch one, slot for
slot, on fresh random routings."""

import pytest
import torch

from moeserve.kernels import moe_layout
from moeserve.kernels.moe_layout import block_layout_chunked, block_layout_reference, block_layout_single_program
from tests.kernels.poison import PoisonedTorch


class PoisonedIntegers(PoisonedTorch):
    """Integer outputs start as a value no slot, expert or count can take."""

    @staticmethod
    def empty(*args, **kwargs):
        tensor = torch.empty(*args, **kwargs)
        return tensor.fill_(-7 if not tensor.is_floating_point() else float("nan"))


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(moe_layout, "torch", PoisonedIntegers())


@pytest.mark.parametrize("kernel", [block_layout_single_program, block_layout_chunked])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("rows,top_k,experts,block_m", [(1, 6, 64, 16), (37, 6, 64, 16), (200, 8, 60, 64),
                                                       (5, 2, 8, 128), (0, 6, 64, 16), (700, 4, 256, 32),
                                                       (2100, 8, 256, 64)])
def test_triton_layouts_equal_reference(rows, top_k, experts, block_m, dtype, kernel):
    slots = torch.stack([torch.randperm(experts)[:top_k] for _ in range(rows)]) if rows else torch.empty(0, top_k)
    slots = slots.to(dtype)
    if rows:
        slots[torch.rand(rows, top_k) < 0.2] = -1  # pairs whose expert lives on another rank
    got = kernel(slots, experts, block_m)
    want = block_layout_reference(slots, experts, block_m)
    assert torch.equal(got.sorted_rows, want.sorted_rows)
    assert torch.equal(got.block_expert, want.block_expert)
    assert torch.equal(got.num_padded, want.num_padded)
    assert torch.equal(got.counts, want.counts)
    assert (got.num_rows, got.block_m) == (want.num_rows, want.block_m)


@pytest.mark.parametrize("kernel", [block_layout_single_program, block_layout_chunked])
def test_skewed_routing_fills_one_expert(kernel):
    slots = torch.zeros(50, 4, dtype=torch.int32)
    slots[:, 1:] = torch.arange(1, 4, dtype=torch.int32)  # every row to experts 0-3
    got = kernel(slots, 16, 16)
    want = block_layout_reference(slots, 16, 16)
    assert torch.equal(got.sorted_rows, want.sorted_rows) and torch.equal(got.block_expert, want.block_expert)


@pytest.mark.parametrize("kernel", [block_layout_single_program, block_layout_chunked])
@pytest.mark.parametrize("rows", [5, 130])
def test_a_column_view_of_sorted_ids_is_read_by_its_strides(kernel, rows):
    ranked = torch.stack([torch.randperm(8) for _ in range(rows)])  # [R, 8]: Llama 4 keeps the first
    slots = ranked[:, :1]  # stride (8, 1): flattening it keeps a stride of 8
    got, want = kernel(slots, 8, 16), block_layout_reference(slots, 8, 16)
    assert torch.equal(got.sorted_rows, want.sorted_rows) and torch.equal(got.counts, want.counts)
