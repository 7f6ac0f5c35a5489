"""Token payloads on the wire: round trips, byte layout, zero-copy views, documented errors."""

import pytest
import torch

from moeserve.distributed.ep.token_formats import Nvfp4Format, token_format
from moeserve.quant.fp8 import dequantize_fp8_groups, quantize_fp8_groups
from moeserve.quant.nvfp4 import dequantize_nvfp4, global_scale_of, quantize_nvfp4


def tokens(num_tokens: int, hidden: int) -> torch.Tensor:
    return (torch.randn(num_tokens, hidden) * torch.rand(num_tokens, 1) * 4).to(torch.bfloat16)


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 33])
@pytest.mark.parametrize("hidden", [128, 384, 7168])
def test_round_trips(num_tokens, hidden):
    x = tokens(num_tokens, hidden)
    for name, bound in (("bf16", 0.0), ("fp8", 0.04), ("nvfp4", 0.12)):
        fmt = token_format(name)
        payload = fmt.pack(x)
        assert payload.dtype == torch.uint8 and payload.shape == (num_tokens, fmt.payload_bytes(hidden))
        restored = fmt.unpack(payload, hidden, torch.float32)
        assert restored.shape == x.shape and torch.isfinite(restored).all()
        if num_tokens:
            error = ((restored - x.float()).norm() / x.float().norm()).item()
            assert error <= bound, name


def test_payload_sizes_follow_the_documented_layout():
    assert token_format("bf16").payload_bytes(7168) == 14336
    assert token_format("bf16", torch.float32).payload_bytes(7168) == 28672  # fp32 runs send fp32
    assert token_format("fp8").payload_bytes(7168) == 7168 + 56 * 4
    assert token_format("nvfp4").payload_bytes(7168) == 3584 + 448 + 4


def test_fp8_payload_is_the_per_token_group_quantization_and_views_share_memory():
    x = tokens(5, 256)
    fmt = token_format("fp8")
    payload = fmt.pack(x)
    values, scales = quantize_fp8_groups(x)
    views = fmt.views(payload, 256)
    assert torch.equal(views.values.view(torch.uint8), values.view(torch.uint8)) and torch.equal(views.scales, scales)
    assert views.values.data_ptr() == payload.data_ptr()
    assert views.scales.data_ptr() == payload.data_ptr() + 256
    assert torch.equal(fmt.unpack(payload, 256, torch.float32), dequantize_fp8_groups(values, scales))


def test_nvfp4_payload_layout_and_per_token_global_scale():
    x = tokens(6, 128)
    fmt = Nvfp4Format()
    views = fmt.views(fmt.pack(x), 128)
    expected_global = global_scale_of(x.float().abs().amax(dim=-1, keepdim=True))
    assert torch.equal(views.global_scales, expected_global)
    packed, scales = quantize_nvfp4(x, expected_global)
    assert torch.equal(views.packed, packed) and torch.equal(views.block_scales.view(torch.uint8), scales.view(torch.uint8))
    torch.testing.assert_close(fmt.unpack(fmt.pack(x), 128, torch.float32),
                               dequantize_nvfp4(packed, scales, expected_global), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["fp8", "nvfp4"])
def test_hidden_sizes_that_are_not_multiples_of_128_are_refused(name):
    with pytest.raises(ValueError, match=f"the {name} token format needs a hidden size divisible by 128, got 200"):
        token_format(name).pack(tokens(3, 200))


def test_nan_in_one_token_stays_in_that_token():
    x = tokens(3, 128).float()
    x[1, 7] = float("nan")
    for name in ("fp8", "nvfp4"):
        fmt = token_format(name)
        restored = fmt.unpack(fmt.pack(x), 128, torch.float32)
        assert restored[1].isnan().any() and not restored[[0, 2]].isnan().any(), name


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown token format 'int4' \\(known: bf16, fp8, nvfp4\\)"):
        token_format("int4")


def received_rows(payload: torch.Tensor, extra: int) -> torch.Tensor:
    """The payload as a receive area holds it: each row followed by `extra` bytes of metadata (rows strided)."""
    rows = torch.randint(0, 256, (payload.shape[0], payload.shape[1] + extra), dtype=torch.uint8)
    rows[:, : payload.shape[1]] = payload
    return rows[:, : payload.shape[1]]


@pytest.mark.parametrize("hidden,rows_at_once", [(128, 1), (384, 4), (2048, 1), (2048, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_nvfp4_receive_kernel_equals_the_torch_unpack_on_strided_rows(hidden, rows_at_once, dtype):
    """nvfp4_tokens (the CUDA receive) bit for bit against Nvfp4Format.unpack, with block scales over six decades
    (subnormal E4M3 ones too), negative zeros, and a NaN token that stays NaN; a row or several a program (the last
    block partial)."""
    from moeserve.kernels.ep_transport import nvfp4_tokens

    fmt = Nvfp4Format()
    decades = 10.0 ** torch.linspace(-4, 2, hidden // 16).repeat_interleave(16)
    x = torch.randn(6, hidden) * decades
    x[1, :16] = -0.0
    x[4, 5] = float("nan")
    payload = received_rows(fmt.pack(x.bfloat16()), extra=24)
    got, want = nvfp4_tokens(payload, hidden, dtype, rows_at_once=rows_at_once), fmt.unpack(payload, hidden, dtype)
    assert got.dtype == dtype and torch.equal(got.isnan(), want.isnan()) and want[4].isnan().all()
    assert torch.equal(got.nan_to_num().view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want.nan_to_num().view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    assert nvfp4_tokens(payload[:0], hidden, dtype).shape == (0, hidden)
    in_use = torch.tensor([True, False, True, True, False, True])  # a low-latency receive's rows that hold no token
    some = nvfp4_tokens(payload, hidden, dtype, in_use, rows_at_once)
    assert torch.equal(some[in_use].view(torch.uint8), got[in_use].view(torch.uint8))  # the others: left unwritten
    tail = torch.tensor([False, False, False, False, True, True])  # a program whose rows are all unused stops early
    some = nvfp4_tokens(payload, hidden, dtype, tail, rows_at_once)
    assert torch.equal(some[tail].view(torch.uint8), got[tail].view(torch.uint8))


def test_unquantized_rows_are_received_where_they_lie():
    x = tokens(5, 256)
    fmt = token_format("bf16")
    payload = received_rows(fmt.pack(x), extra=32)  # rows of 272 values: a stride of 16s, as the p2p rows are padded
    received = fmt.receive(payload, 256, torch.bfloat16)
    assert received.data_ptr() == payload.data_ptr() and torch.equal(received, x)
    assert torch.equal(fmt.receive(payload, 256, torch.float32), x.float())  # another dtype: a converted copy
    unaligned = received_rows(fmt.pack(x), extra=16)  # 264 values: the GEMM would load it element by element
    copied = fmt.receive(unaligned, 256, torch.bfloat16)
    assert copied.is_contiguous() and copied.data_ptr() != unaligned.data_ptr() and torch.equal(copied, x)


def test_nvfp4_rows_are_received_where_they_lie_and_dequantize_like_unpack():
    fmt = Nvfp4Format()
    x = tokens(5, 256)
    payload = received_rows(fmt.pack(x), extra=40)
    in_use = torch.tensor([True, False, True, True, True])
    received = fmt.receive(payload, 256, torch.bfloat16, rows_in_use=in_use)
    assert received.rows.data_ptr() == payload.data_ptr() and received.shape == (5, 256)
    assert received.rows_in_use is in_use  # for a conversion that skips the rows holding no token
    assert received.packed.data_ptr() == payload.data_ptr()
    assert received.block_scales.data_ptr() == payload.data_ptr() + 128
    assert received.global_scales.data_ptr() == payload.data_ptr() + 144
    assert torch.equal(received.dequantize(), fmt.unpack(payload, 256, torch.bfloat16))
