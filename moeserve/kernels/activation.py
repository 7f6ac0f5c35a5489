"""SiLU-and-mul, optionally fused with the FP8 per-token 1x128 quantization of its output, and the
top-k reduce. References: torch (silu(gate) * up; moeserve.quant.fp8.quantize_fp8_groups; a sum)."""

import torch
import triton
import triton.language as tl

FP8_GROUP = 128


@triton.jit
def round_to_e4m3_grid(x):
    """x (|x| <= 448) rounded to the nearest E4M3 value, ties to even, still in fp32: adding and
    subtracting 1.5 * 2^(23 + q) rounds to a multiple of 2^q, the E4M3 spacing at x's exponent. The
    cast to fp8 that follows is then exact (the Triton interpreter's own cast rounds wrongly)."""
    magnitude = tl.abs(x)
    exponent = ((magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    quantum = tl.maximum(exponent, -6) - 3  # 3 mantissa bits; subnormals below 2^-6 step by 2^-9
    magic = 1.5 * tl.exp2((23 + quantum).to(tl.float32))
    rounded = (magnitude + magic) - magic
    # x's sign bit put back as a bit (a select on x < 0 compiled on an H100 to +0 for negatives that round to 0)
    sign = x.to(tl.int32, bitcast=True) & -2147483648
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def max_keeping_nan(a, b):
    """max(a, b), NaN if either is (the GPU's plain max drops a NaN; torch's keeps it); a combine function for
    tl.reduce."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def min_keeping_nan(a, b):
    """min(a, b), NaN if either is (as torch's clamp)."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def quantize_e4m3_group(y, axis: tl.constexpr):
    """A group of fp32 values along `axis` -> (E4M3 values, the group's scale amax / 448), as
    moeserve.quant.fp8.quantize_fp8_groups computes them: correctly rounded divisions (a plain `/` is
    approximate on the GPU), a NaN anywhere in a group makes its scale and values NaN, zero-padded
    elements of a partial group count as 0."""
    amax = tl.reduce(tl.abs(y), axis, max_keeping_nan)
    scale = tl.math.div_rn(max_keeping_nan(amax, 1e-12), 448.0)  # a NaN divided as the GPU divides it
    divisor = scale if axis == 0 else tl.expand_dims(scale, axis)
    # A zero dividend sends the GPU's correctly rounded division down its slow path (the padded rows of every
    # decode tile are zeros): divide something else there and keep the zero, with its sign.
    scaled = tl.where(y == 0, y, tl.math.div_rn(tl.where(y == 0, 1.0, y), divisor))
    clamped = tl.minimum(tl.maximum(scaled, -448.0), 448.0)
    clamped = tl.where(scaled != scaled, scaled, clamped)  # the GPU's min / max would drop a NaN
    return round_to_e4m3_grid(clamped).to(tl.float8e4nv), scale


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, scale_ptr, slots_ptr, intermediate, stride_in, stride_out, stride_scale,
                         BLOCK: tl.constexpr, QUANTIZE: tl.constexpr, ROUND_SILU: tl.constexpr, ROWS_IN_USE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    if ROWS_IN_USE:
        if tl.load(slots_ptr + row) < 0:  # a row no expert computed: nothing to read, nothing anyone reads
            return
    offs = group * BLOCK + tl.arange(0, BLOCK)
    ok = offs < intermediate
    gate = tl.load(gate_up_ptr + row * stride_in + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + intermediate + offs, mask=ok, other=0.0).to(tl.float32)
    silu = gate * tl.sigmoid(gate)
    if ROUND_SILU:  # as an eager silu(gate) * up in bf16 rounds: silu first, then the product
        silu = silu.to(gate_up_ptr.dtype.element_ty).to(tl.float32)
    y = silu * up
    if QUANTIZE:  # one scale per 128 values
        q, scale = quantize_e4m3_group(y, 0)
        tl.store(out_ptr + row * stride_out + offs, q, mask=ok)
        tl.store(scale_ptr + row * stride_scale + group, scale)
    else:
        tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(gate_up: torch.Tensor, quantize: bool = False, round_silu: bool = False,
                 slots: torch.Tensor | None = None):
    """gate_up [R, 2I] -> silu(gate) * up [R, I] in gate_up's dtype, or (FP8 values, scales [R, ceil(I/128)]).
    Computed in fp32 and rounded once; `round_silu` rounds silu(gate) to gate_up's dtype first, as the
    eager torch expression does. slots (integers [R]): rows with -1 are skipped (their outputs left unwritten)."""
    rows, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    groups = triton.cdiv(intermediate, FP8_GROUP)
    if quantize:
        out = torch.empty(rows, intermediate, dtype=torch.float8_e4m3fn, device=gate_up.device)
        scales = torch.empty(rows, groups, dtype=torch.float32, device=gate_up.device)
    else:
        out, scales = torch.empty(rows, intermediate, dtype=gate_up.dtype, device=gate_up.device), None
    if rows:
        _silu_and_mul_kernel[(rows, groups)](gate_up, out, scales if quantize else out,
                                             slots if slots is not None else gate_up, intermediate,
                                             gate_up.stride(0), out.stride(0), scales.stride(0) if quantize else 0,
                                             BLOCK=FP8_GROUP, QUANTIZE=quantize, ROUND_SILU=round_silu,
                                             ROWS_IN_USE=slots is not None)
    return (out, scales) if quantize else out


@triton.jit
def _sum_over_k_kernel(y_ptr, slots_ptr, out_ptr, hidden, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
                       ROWS_IN_USE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < hidden
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        use = ok
        if ROWS_IN_USE:  # a (row, k) no expert here computed holds nothing: read as 0
            use = ok & (tl.load(slots_ptr + row * TOP_K + k) >= 0)
        acc += tl.load(y_ptr + (row * TOP_K + k) * hidden + offs, mask=use, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sum_over_k(y: torch.Tensor, top_k: int, slots: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """y [R * K, H] (the K expert outputs of each row, weighted) -> [R, H] (into out if given: contiguous, any float
    dtype). slots (integers [R * K]): entries of -1 are read as 0 (y there may be unwritten)."""
    rows, hidden = y.shape[0] // top_k, y.shape[1]
    if out is None:
        out = torch.empty(rows, hidden, dtype=y.dtype, device=y.device)
    elif out.shape != (rows, hidden) or not out.is_contiguous():
        raise ValueError(f"sum_over_k writes a contiguous [{rows}, {hidden}], got {tuple(out.shape)} "
                         f"{'' if out.is_contiguous() else 'non-contiguous'}")
    if rows:
        _sum_over_k_kernel[(rows, triton.cdiv(hidden, 1024))](y, slots if slots is not None else y, out, hidden,
                                                              TOP_K=top_k, BLOCK=1024, ROWS_IN_USE=slots is not None)
    return out


@triton.jit
def _quantize_groups_kernel(x_ptr, out_ptr, scale_ptr, num_rows, num_cols, stride_x, stride_out, stride_scale_row,
                            stride_scale_group, GROUPS: tl.constexpr, GROUP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    offs = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [GROUPS, GROUP]
    ok = offs < num_cols
    y = tl.load(x_ptr + row * stride_x + offs, mask=ok & (row < num_rows), other=0.0).to(tl.float32)
    q, scale = quantize_e4m3_group(y, 1)
    tl.store(out_ptr + row * stride_out + offs, q, mask=ok)
    tl.store(scale_ptr + row * stride_scale_row + groups * stride_scale_group, scale,
             mask=groups < tl.cdiv(num_cols, GROUP))


def quantize_fp8_activations(x: torch.Tensor, pad_rows_to: int = 1, column_major_scales: bool = False):
    """x [T, K] -> (FP8 values [T', K], scales [T', ceil(K/128)] fp32), one pass, computed as
    moeserve.quant.fp8.quantize_fp8_groups computes them, bit for bit (but for a zero in a group with a NaN: code 0 here,
    NaN there; the group's scale is NaN either way). T' is T rounded up to pad_rows_to (the added rows quantize zeros);
    column_major_scales stores the scales group by group ([groups, T'] seen transposed), as cuBLAS's block scaling
    reads them."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows, cols = x.shape
    padded = triton.cdiv(rows, pad_rows_to) * pad_rows_to
    groups = triton.cdiv(cols, FP8_GROUP)
    values = torch.empty(padded, cols, dtype=torch.float8_e4m3fn, device=x.device)
    if column_major_scales:
        scales = torch.empty(groups, padded, dtype=torch.float32, device=x.device).t()
    else:
        scales = torch.empty(padded, groups, dtype=torch.float32, device=x.device)
    per_program = min(8, triton.next_power_of_2(groups))
    if padded and cols:
        _quantize_groups_kernel[(padded, triton.cdiv(groups, per_program))](
            x, values, scales, rows, cols, x.stride(0), values.stride(0), scales.stride(0), scales.stride(1),
            GROUPS=per_program, GROUP=FP8_GROUP)
    return values, scales
