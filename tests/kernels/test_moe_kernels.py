"""MoE kernels against their torch references (CPU: Triton interpreter; GPU: tests/gpu)."""

import pytest
import torch
import torch.nn.functional as F

from moeserve.kernels.activation import silu_and_mul, sum_over_k
from moeserve.kernels import fused_moe
from moeserve.kernels.fused_moe import fused_experts
from moeserve.kernels.moe_gemm import GemmConfig, moe_gemm
from moeserve.kernels.moe_layout import block_layout
from moeserve.kernels.row_layout import RowLayout
from moeserve.layers.moe.experts import Experts
from moeserve.quant.fp8 import fp8_group_round_trip, quantize_fp8_groups
from moeserve.quant.formats import make_quantized_weight

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 128, 64, 4, 2


def random_experts(fmt: str | None, dtype=torch.float32, seed=0) -> Experts:
    generator = torch.Generator().manual_seed(seed)
    experts = Experts(EXPERTS, HIDDEN, INTERMEDIATE)
    gate_up = torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=generator) / HIDDEN**0.5
    down = torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, generator=generator) / INTERMEDIATE**0.5
    if fmt is None:
        experts.gate_up_proj.data, experts.down_proj.data = gate_up.to(dtype), down.to(dtype)
        return experts
    del experts.gate_up_proj, experts.down_proj
    experts.gate_up_proj = make_quantized_weight(fmt, (EXPERTS, 2, INTERMEDIATE, HIDDEN))
    experts.down_proj = make_quantized_weight(fmt, (EXPERTS, HIDDEN, INTERMEDIATE))
    experts.gate_up_proj.quantize_from(gate_up)
    experts.down_proj.quantize_from(down)
    return experts


def routing(rows: int, case: str, seed=1) -> RowLayout:
    generator = torch.Generator().manual_seed(seed)
    slots = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(rows)])
    if case == "one expert":
        slots[:, 0] = 2  # every row uses expert 2; expert 3 may see nothing
        slots[:, 1] = torch.where(slots[:, 1] == 2, 0, slots[:, 1])
    if case == "other ranks":
        slots[::3, 1] = -1  # rows whose second expert lives elsewhere
    weights = torch.rand(rows, TOP_K, generator=generator)
    return RowLayout(slots, weights)


def test_block_layout_groups_rows_by_expert_in_whole_blocks():
    layout = routing(9, "other ranks")
    block = block_layout(layout.slots, EXPERTS, block_m=4)
    flat = layout.slots.flatten()
    used = int(block.num_padded)
    assert block.sorted_rows.numel() % 4 == 0 and used % 4 == 0
    for b, expert in enumerate(block.block_expert.tolist()):
        rows = block.sorted_rows[4 * b : 4 * b + 4]
        real = rows[rows < flat.numel()].long()
        if 4 * b >= used:
            assert expert == -1 and real.numel() == 0
        else:
            assert (flat[real] == expert).all()
    placed = block.sorted_rows[block.sorted_rows < flat.numel()].long()
    assert sorted(placed.tolist()) == (flat >= 0).nonzero().flatten().tolist()  # each pair once, none for -1
    assert block.counts.tolist() == [int((flat == e).sum()) for e in range(EXPERTS)]
    compact = block_layout(layout.slots, EXPERTS, block_m=4, compact=True)
    assert torch.equal(compact.sorted_rows, block.sorted_rows[: compact.sorted_rows.numel()])


def reference_w8a8(experts: Experts, x: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """W8A8 semantics, row by row: activations pass through FP8 1x128 quantization before each GEMM."""
    fp8 = fp8_group_round_trip

    out = torch.zeros_like(x)
    for row in range(x.shape[0]):
        for k in range(TOP_K):
            e = int(layout.slots[row, k])
            if e < 0:
                continue
            gate_up = experts.gate_up_proj.dequantize(torch.float32, e).reshape(-1, HIDDEN)
            gate, up = F.linear(fp8(x[row : row + 1]), gate_up).chunk(2, dim=-1)
            h = fp8(F.silu(gate) * up)
            out[row] += layout.weights[row, k] * F.linear(h, experts.down_proj.dequantize(torch.float32, e))[0]
    return out


def assert_fused_experts_match(fmt, rows, case, config):
    # seeded: with FP8 activations, a split-K sum can round an intermediate to the neighbouring FP8 code of
    # the reference's, and that row then differs by a quantum (1 in ~20 unseeded runs); a seed keeps it
    # reproducible while the inputs stay random
    torch.manual_seed(rows)
    experts = random_experts(fmt)
    x = torch.randn(rows, HIDDEN)
    layout = routing(rows, case)
    actual = fused_experts(experts, x, layout, config)
    expected = experts(x, layout)  # the torch reference on the CPU
    if fmt == "fp8":
        torch.testing.assert_close(expected, reference_w8a8(experts, x, layout), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["random", "one expert", "other ranks"])
@pytest.mark.parametrize("fmt", [None, "nvfp4", "fp8"])
def test_fused_experts_match_the_reference(fmt, case):
    assert_fused_experts_match(fmt, 7, case, GemmConfig(block_m=16, block_n=64, block_k=128))


@pytest.mark.parametrize("fmt", [None, "nvfp4", "fp8"])
@pytest.mark.parametrize("config", [
    GemmConfig(block_m=16, block_n=64, block_k=64, split_k=2),  # K = 128: one BLOCK_K step per slice
    GemmConfig(block_m=16, block_n=32, block_k=32, split_k=3),  # slices of unequal length, the last short
    GemmConfig(block_m=16, block_n=32, block_k=64, group_m=2, persistent=True),  # 3 programs loop over tiles
    GemmConfig(block_m=16, block_n=64, block_k=128, swap_ab=True),  # W @ a^T, stored transposed
    GemmConfig(block_m=16, block_n=32, block_k=64, split_k=2, swap_ab=True),
], ids=["split2", "split3", "persistent-grouped", "swap-ab", "swap-ab-split2"])
def test_split_k_and_persistent_grouped_tiles_match_the_reference(fmt, config):
    assert_fused_experts_match(fmt, 9, "other ranks", config)


def test_bf16_weights_and_activations():
    experts = random_experts(None, torch.bfloat16)
    x = torch.randn(5, HIDDEN).to(torch.bfloat16)
    layout = routing(5, "random")
    actual = fused_experts(experts, x, layout, GemmConfig(block_m=16, block_n=64, block_k=64)).float()
    expected = experts(x, layout).float()
    # bf16 operands land within 1e-2 on a GPU (tests/gpu); the interpreter truncates each fp32 -> bf16
    # store instead of rounding (about 0.7% per cast, three casts here), hence 2e-2 on the CPU
    assert ((actual - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.parametrize("group_m", [1, 3, 8])
@pytest.mark.parametrize("persistent", [False, True])
def test_gemm_writes_every_valid_row_and_nothing_else_in_any_tile_order(group_m, persistent):
    experts = random_experts(None)
    x = torch.randn(11, HIDDEN)
    layout = routing(11, "other ranks")
    block = block_layout(layout.slots, EXPERTS, block_m=16)
    out = torch.full((11 * TOP_K, 2 * INTERMEDIATE), float("nan"))
    config = GemmConfig(16, 16, 64, group_m=group_m, persistent=persistent)  # 8 N tiles, groups may be partial
    moe_gemm(x, None, experts.gate_up_proj, block, out, rows_per_a_row=TOP_K, config=config)
    valid = layout.slots.flatten() >= 0
    assert torch.isfinite(out[valid]).all() and out[~valid].isnan().all()
    for row in valid.nonzero().flatten().tolist():
        e = int(layout.slots.flatten()[row])
        torch.testing.assert_close(out[row], experts.gate_up_proj[e] @ x[row // TOP_K], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("intermediate", [64, 200, 256])
def test_silu_and_mul_with_and_without_fp8(intermediate):
    gate_up = torch.randn(5, 2 * intermediate) * 3
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(gate_up), F.silu(gate) * up)
    values, scales = silu_and_mul(gate_up, quantize=True)
    ref_values, ref_scales = quantize_fp8_groups(F.silu(gate) * up)
    # SiLU as x * sigmoid(x) (kernel) or x / (1 + e^-x) (torch) can differ by an ulp, and so can the
    # scale; a value may then round to the neighbouring E4M3 step, never further
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)
    a, b = values.float(), ref_values.float()
    step = torch.maximum(b.abs() * 2.0**-3, torch.full_like(b, 2.0**-9))
    assert ((a - b).abs() <= step).all() and (a != b).float().mean() < 0.01


def test_sum_over_k():
    y = torch.randn(5 * 3, 70)
    torch.testing.assert_close(sum_over_k(y, 3), y.view(5, 3, 70).sum(dim=1))
    out = torch.full((5, 70), float("nan"))
    assert sum_over_k(y, 3, out=out) is out
    torch.testing.assert_close(out, y.view(5, 3, 70).sum(dim=1))
    with pytest.raises(ValueError, match="contiguous"):
        sum_over_k(y, 3, out=torch.empty(70, 5).t())


def test_the_experts_write_into_the_buffer_they_are_given():
    """A transport's results area (moeserve.distributed.ep.peer_to_peer): the fused kernels and the reference write
    there, what they return."""
    experts = random_experts("fp8")
    x, layout = torch.randn(6, HIDDEN), routing(6, "other ranks")
    for run in (lambda out: fused_experts(experts, x, layout, GemmConfig(block_m=16, block_n=64, block_k=128), out),
                lambda out: experts(x, layout, out=out)):
        out = torch.full((6, HIDDEN), float("nan"))
        assert run(out) is out
        torch.testing.assert_close(out, run(None))



def test_silu_and_mul_can_round_silu_first_as_eager_bf16_does():
    gate_up = (torch.randn(6, 2 * 200) * 3).to(torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    out = silu_and_mul(gate_up, round_silu=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=2**-7, atol=0)  # sigmoid forms differ by an ulp


@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("block_n", [32, 64, 128])
def test_fp8_tiles_inside_one_weight_scale_block_read_that_blocks_scale(block_n, swap_ab):
    """gate_up halves of 256 rows (two 128-row scale blocks each), each block scaled by another power of two: a tile
    that read a neighbouring block's scale would be off by a factor of 2 or more."""
    from moeserve.kernels.moe_gemm import tile_in_one_scale_block

    num_experts, hidden, intermediate, top_k, rows = 3, 256, 256, 2, 5
    generator = torch.Generator().manual_seed(block_n)
    gate_up = torch.randn(num_experts, 2 * intermediate, hidden, generator=generator) / hidden**0.5
    gate_up *= (2.0 ** torch.arange(4)).repeat_interleave(128)[None, :, None]
    weight = make_quantized_weight("fp8", (num_experts, 2, intermediate, hidden))
    weight.quantize_from(gate_up)
    config = GemmConfig(block_m=16, block_n=block_n, block_k=128, swap_ab=swap_ab)
    assert tile_in_one_scale_block(intermediate, config)
    import moeserve.kernels.moe_gemm as moe_gemm_module

    chosen = []
    original = moe_gemm_module.tile_in_one_scale_block
    moe_gemm_module.tile_in_one_scale_block = lambda *args, **kwargs: chosen.append(
        original(*args, **kwargs)) or chosen[-1]
    x = torch.randn(rows, hidden, generator=generator)
    slots = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(rows)])
    a, a_scale = quantize_fp8_groups(x)
    out = torch.full((rows * top_k, 2 * intermediate), float("nan"))
    try:
        moe_gemm(a, a_scale, weight, block_layout(slots, num_experts, 16), out, rows_per_a_row=top_k, config=config)
    finally:
        moe_gemm_module.tile_in_one_scale_block = original
    assert chosen == [True]  # the launch took the one-scale path
    x_w8a8 = fp8_group_round_trip(x)
    for row, expert in enumerate(slots.flatten().tolist()):
        expected = weight.dequantize(torch.float32, expert).reshape(2 * intermediate, hidden) @ x_w8a8[row // top_k]
        torch.testing.assert_close(out[row], expected, rtol=1e-4, atol=1e-4)


def test_fp8_experts_take_an_fp8_dispatchs_tokens_as_they_arrived(monkeypatch):
    """Rows received over an FP8 dispatch (strided views of the byte payload) give, bit for bit, what quantizing the
    same tokens in the experts gives; bf16 and NVFP4 experts dequantize them first."""
    from moeserve.distributed.ep.token_formats import Fp8Format, as_row_bytes

    torch.manual_seed(3)
    x = torch.randn(6, HIDDEN)
    layout = routing(6, "other ranks")
    wire = Fp8Format()
    payload = torch.cat((wire.pack(x), as_row_bytes(layout.slots.int())), dim=1)  # as dispatched: metadata after
    received = wire.receive(payload, HIDDEN, torch.float32)
    assert received.values.stride(0) == payload.shape[1]  # read in place, not copied
    arrived = received.dequantize()
    for fmt in ("fp8", None, "nvfp4"):
        experts = random_experts(fmt)
        expected = fused_experts(experts, arrived, layout)
        with monkeypatch.context() as patch:  # FP8 experts must not quantize the tokens again
            patch.setattr(fused_moe, "quantize_fp8_activations", lambda *args: pytest.fail("quantized twice"))
            actual = fused_experts(experts, received, layout)
        assert torch.isfinite(actual).all()
        assert torch.equal(actual, expected), fmt


@pytest.mark.parametrize("config", [GemmConfig(16, 32, 64), GemmConfig(16, 32, 64, swap_ab=True),
                                    GemmConfig(16, 128, 256)], ids=["as-is", "swapped", "k256"])
def test_nvfp4_experts_with_bf16_activations_turn_codes_into_bf16_by_bits(config):
    """bf16 activations take the NVFP4 path that builds each code's bf16 from its bits and scales the sums by the global
    scale: the same products as the reference's dequantized weights, summed in fp32."""
    torch.manual_seed(3)
    experts = random_experts("nvfp4")
    x = torch.randn(6, HIDDEN).to(torch.bfloat16)
    layout = routing(6, "random")
    actual = fused_experts(experts, x, layout, config).float()
    expected = experts(x.float(), layout)  # fp32 reference on the same bf16 inputs
    assert torch.isfinite(actual).all()
    assert ((actual - expected).norm() / expected.norm()).item() < 2e-2  # the interpreter truncates bf16 stores


@pytest.mark.parametrize("fmt", [None, "fp8"])
def test_pairs_of_other_ranks_are_never_read_when_buffers_start_as_nan(fmt, monkeypatch):
    """gate_up and down start unwritten (NaN here): the (row, k) pairs with no expert here must not reach the sum."""
    import moeserve.kernels.activation as activation_module
    import moeserve.kernels.fused_moe as fused_moe_module
    from tests.kernels.poison import PoisonedTorch

    monkeypatch.setattr(fused_moe_module, "torch", PoisonedTorch())
    monkeypatch.setattr(activation_module, "torch", PoisonedTorch())
    assert_fused_experts_match(fmt, 9, "other ranks", GemmConfig(block_m=16, block_n=64, block_k=128))
    torch.manual_seed(1)
    experts, x = random_experts(fmt), torch.randn(4, HIDDEN)
    layout = routing(4, "random")
    layout.slots[2] = -1  # a row with no expert here at all (an all-gather's or a low-latency receive's): sums to 0
    out = fused_experts(experts, x, layout, GemmConfig(block_m=16, block_n=64, block_k=128))
    assert (out[2] == 0).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("config", [None, GemmConfig(16, 32, 64), GemmConfig(16, 64, 128, swap_ab=True),
                                    GemmConfig(16, 32, 16), GemmConfig(16, 32, 64, split_k=2),
                                    GemmConfig(16, 32, 64, group_m=2, persistent=True)],
                         ids=["tuned", "as-is", "swapped", "k16", "split2", "persistent"])
def test_experts_read_an_nvfp4_dispatchs_tokens_as_they_arrived(config, monkeypatch):
    """Rows received over an NVFP4 dispatch (strided views of the byte payload, metadata after each) go into the gate_up
    GEMM as they are: bf16 and NVFP4 experts give, bit for bit, what the dequantized tokens give (the same bf16 values
    reach the same dots), a NaN token stays in its row; FP8 experts and fp32 tokens dequantize first."""
    from moeserve.distributed.ep.token_formats import Nvfp4Format, as_row_bytes
    from moeserve.quant.nvfp4 import Nvfp4Activations

    torch.manual_seed(4)
    decades = 10.0 ** torch.linspace(-3, 1, HIDDEN // 16).repeat_interleave(16)
    x = (torch.randn(7, HIDDEN) * decades[torch.randperm(HIDDEN)]).bfloat16()
    x[5, 3] = float("nan")
    layout = routing(7, "other ranks")
    wire = Nvfp4Format()
    payload = torch.cat((wire.pack(x), as_row_bytes(layout.slots.int())), dim=1)[:, : wire.payload_bytes(HIDDEN)]
    received = wire.receive(payload, HIDDEN, torch.bfloat16)
    assert isinstance(received, Nvfp4Activations) and received.rows.data_ptr() == payload.data_ptr()
    arrived = received.dequantize()
    gemm_inputs = []
    monkeypatch.setattr(fused_moe, "moe_gemm", lambda a, *args, **kwargs: gemm_inputs.append(a) or moe_gemm(
        a, *args, **kwargs))
    for fmt in (None, "nvfp4", "fp8"):
        experts = random_experts(fmt, torch.bfloat16)
        expected = fused_experts(experts, arrived, layout, config)
        gemm_inputs.clear()
        actual = fused_experts(experts, received, layout, config)
        assert (gemm_inputs[0] is received) == (fmt != "fp8"), fmt  # FP8 experts take it dequantized and quantized
        assert torch.equal(actual.isnan(), expected.isnan()) and actual[5].isnan().any(), fmt
        assert torch.isfinite(actual[[0, 1, 2, 3, 4, 6]]).all(), fmt
        assert torch.equal(actual.nan_to_num(), expected.nan_to_num()), fmt
    as_fp32 = Nvfp4Activations(payload, HIDDEN, torch.float32)  # fp32 runs: dequantized first, then fp32 GEMMs
    experts = random_experts(None)
    assert torch.equal(fused_experts(experts, as_fp32, layout, config).nan_to_num(),
                       fused_experts(experts, as_fp32.dequantize(), layout, config).nan_to_num())


@pytest.mark.parametrize("block_n", [32, 64, 128])
def test_one_fp8_matrix_with_a_partial_last_block_reads_one_scale_a_tile(block_n):
    """A dense FP8 matrix whose rows end inside a scale block (a fused q + kv_a: 2.5 blocks here), each block scaled by
    another power of two: its tiles take the one-scale path and each reads its own block's scale."""
    import moeserve.kernels.moe_gemm as moe_gemm_module
    from moeserve.kernels.moe_gemm import dense_gemm

    generator = torch.Generator().manual_seed(block_n)
    w = torch.randn(320, 256, generator=generator) / 16 * (2.0 ** torch.arange(3)).repeat_interleave(128)[:320, None]
    weight = make_quantized_weight("fp8", (320, 256))
    weight.quantize_from(w)
    x = torch.randn(5, 256, generator=generator)
    a, a_scale = quantize_fp8_groups(x)
    out = torch.full((5, 320), float("nan"))
    chosen = []
    original = moe_gemm_module.tile_in_one_scale_block
    moe_gemm_module.tile_in_one_scale_block = lambda *args, **kwargs: chosen.append(
        original(*args, **kwargs)) or chosen[-1]
    try:
        dense_gemm(a, a_scale, weight, out, GemmConfig(block_m=16, block_n=block_n, block_k=128))
    finally:
        moe_gemm_module.tile_in_one_scale_block = original
    assert chosen == [True]
    expected = fp8_group_round_trip(x) @ weight.dequantize(torch.float32).t()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_nvfp4_rows_into_fp8_weights_are_refused_with_what_to_do():
    from moeserve.distributed.ep.token_formats import Nvfp4Format

    wire = Nvfp4Format()
    received = wire.receive(wire.pack(torch.randn(3, HIDDEN).bfloat16()), HIDDEN, torch.bfloat16)
    experts = random_experts("fp8", torch.bfloat16)
    layout = routing(3, "random")
    block = block_layout(layout.slots, EXPERTS, 16)
    out = torch.empty(3 * TOP_K, 2 * INTERMEDIATE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="NVFP4 activations go into bf16 or NVFP4 weights .* dequantize them first"):
        moe_gemm(received, None, experts.gate_up_proj, block, out, rows_per_a_row=TOP_K, config=GemmConfig(16, 64, 128))
