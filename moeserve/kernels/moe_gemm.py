"""Grouped GEMM over the experts of a BlockLayout, one kernel for three weight formats.

out[row] = a[row // rows_per_a_row] @ W[expert(row)]^T (* row_weight[row]): the activations are read
by row index (no permuted copy); the routed weight is applied in the epilogue (down projection).
Formats: bf16 (or fp32) weights; FP8 128x128 block weights with FP8 1x128 per-token activations
(W8A8: the block scales multiply each K step's partial product, accumulation in fp32); NVFP4 weights
dequantized in registers and multiplied with 16-bit activations (W4A16; Hopper has no FP4 MMA).
Quantized gate_up weights keep separate scales for their gate and up halves (`n_part` rows each).
Regimes (GemmConfig): decode shapes can cut K into slices (split-K) so that a few active experts still
fill the SMs; prefill shapes can run a persistent grid over grouped tiles (L2 reuse of both operands).
"""

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeserve.kernels.activation import quantize_e4m3_group
from moeserve.kernels.device import multiprocessors
from moeserve.kernels.moe_layout import BlockLayout
from moeserve.quant.formats import Fp8BlockWeight, Nvfp4Weight
from moeserve.quant.nvfp4 import Nvfp4Activations

BF16, FP8, NVFP4 = 0, 1, 2
FP8_QUANTIZING = 3  # FP8 weights, 16-bit activations quantized 1x128 inside the GEMM (BLOCK_K = 128)
IN_GEMM_QUANTIZATION_MAX_ROWS = 16  # callers quantize first above: each N tile would re-quantize its rows
FP8_BLOCK = 128


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 1  # tiles run in groups of group_m M blocks x all N tiles, so L2 reuses both operands
    split_k: int = 1  # > 1: K is cut in split_k slices, their partial sums added up (more CTAs at decode)
    persistent: bool = False  # one CTA per SM looping over the tiles in use (no CTAs for unused blocks)
    swap_ab: bool = False  # the product computed as W @ a^T: few rows on the wgmma's narrow side (decode)


@triton.jit
def e2m1_to_float(code):
    """E2M1 codes (uint8 0-15) -> fp32 (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives): the sign bit placed in an
    fp16's sign, the two exponent bits in its two lowest exponent bits and the mantissa bit in its top mantissa
    bit make the value times 2^-14 (normal and subnormal codes alike)."""
    bits = ((code & 8).to(tl.int16) << 12) | ((code & 7).to(tl.int16) << 9)
    return bits.to(tl.float16, bitcast=True).to(tl.float32) * 16384.0


@triton.jit
def _e2m1_bits_times_scale(packed, scale_bits):
    """Bytes of two E2M1 codes and each byte's bf16 scale (its bits in an int32) -> (low code * scale,
    high code * scale) * 2^-126 in bf16, exact: the portable form of _e2m1_bits_times_scale_ptx (the interpreter
    flushes bf16 subnormals, so the codes go through e2m1_to_float here)."""
    scale = scale_bits.to(tl.int16).to(tl.bfloat16, bitcast=True).to(tl.float32) * 1.1754943508222875e-38
    return (e2m1_to_float(packed & 0xF) * scale).to(tl.bfloat16), (e2m1_to_float(packed >> 4) * scale).to(tl.bfloat16)


@triton.jit
def _e2m1_bits_times_scale_ptx(packed, scale_bits):
    """Bytes of two E2M1 codes and each byte's bf16 scale (its bits in an int32) -> (low code * scale,
    high code * scale) * 2^-126 in bf16, four bytes at a time (any four: each has its own scale; the layout decides
    which). PRMT places two bytes in the high bytes of two 16-bit halves, and two scales in one register; a mask and a
    shift put each nibble's sign at bit 15 and its 3 magnitude bits at bits 8-6 (two codes an instruction), which
    makes the bf16 number value * 2^-126 (subnormal for 0 and 0.5); one bf16x2 multiply scales two, exactly."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 b01, b23, lo01, lo23, t, s01, s23;
        prmt.b32 s01, $5, $6, 0x5410;
        prmt.b32 s23, $7, $8, 0x5410;
        prmt.b32 b01, $4, 0, 0x1404;
        prmt.b32 b23, $4, 0, 0x3424;
        shl.b32 lo01, b01, 4;
        shl.b32 lo23, b23, 4;
        shr.b32 t, lo01, 6;
        and.b32 t, t, 0x01C001C0;
        lop3.b32 lo01, lo01, 0x80008000, t, 0xEA;
        shr.b32 t, lo23, 6;
        and.b32 t, t, 0x01C001C0;
        lop3.b32 lo23, lo23, 0x80008000, t, 0xEA;
        shr.b32 t, b01, 6;
        and.b32 t, t, 0x01C001C0;
        lop3.b32 b01, b01, 0x80008000, t, 0xEA;
        shr.b32 t, b23, 6;
        and.b32 t, t, 0x01C001C0;
        lop3.b32 b23, b23, 0x80008000, t, 0xEA;
        mul.rn.bf16x2 $0, lo01, s01;
        mul.rn.bf16x2 $1, lo23, s23;
        mul.rn.bf16x2 $2, b01, s01;
        mul.rn.bf16x2 $3, b23, s23;
        }
        """,
        constraints="=r,=r,=r,=r,r,r,r,r,r", args=[packed, scale_bits], dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True, pack=4)


@triton.jit
def _nvfp4_even_odd(w_base, w_scale_base, offs_n, n_ok, k0, K, stride_wn, stride_wsn,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr, EVEN_K: tl.constexpr):
    """The weight tile's elements k0, k0 + 2, ... and k0 + 1, k0 + 3, ... ([BLOCK_N, BLOCK_K / 2] each) as bf16
    value * block scale * 2^-62 (2^64 on the scales keeps the products normal; the caller multiplies by 2^62).
    Each scale goes to the conversion as its bits in an int32, so broadcasting it costs no packing."""
    offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    offs_g = k0 // 16 + tl.arange(0, BLOCK_K // 16)
    if EVEN_K:  # whole K steps: only the rows are masked
        packed = tl.load(w_base + offs_n[:, None] * stride_wn + offs_j[None, :], mask=n_ok[:, None], other=0)
        block_scale = tl.load(w_scale_base + offs_n[:, None] * stride_wsn + offs_g[None, :], mask=n_ok[:, None],
                              other=0.0)
    else:
        packed = tl.load(w_base + offs_n[:, None] * stride_wn + offs_j[None, :],
                         mask=n_ok[:, None] & (offs_j < K // 2)[None, :], other=0)
        block_scale = tl.load(w_scale_base + offs_n[:, None] * stride_wsn + offs_g[None, :],
                              mask=n_ok[:, None] & (offs_g < K // 16)[None, :], other=0.0)
    block_scale = (block_scale.to(tl.float32) * 18446744073709551616.0).to(tl.bfloat16)  # * 2^64, exact
    bits = block_scale.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    scale_bits = tl.reshape(tl.broadcast_to(bits[:, :, None], (BLOCK_N, BLOCK_K // 16, 8)), (BLOCK_N, BLOCK_K // 2))
    if USE_ASM:
        return _e2m1_bits_times_scale_ptx(packed, scale_bits)
    return _e2m1_bits_times_scale(packed, scale_bits)


@triton.jit
def _nvfp4_rows_low_high(a_base, glob, valid, k0, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Elements k0, k0 + 2, ... and k0 + 1, k0 + 3, ... ([BLOCK_M, BLOCK_K / 2] bf16 each) of NVFP4 token rows (the
    nvfp4 token format's bytes from a_base, each row's global scale glob): code value * (block scale * global scale)
    in fp32, rounded once to bf16, as dequantize_nvfp4 and the receive kernel make them."""
    offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    offs_g = k0 // 16 + tl.arange(0, BLOCK_K // 16)
    packed = tl.load(a_base[:, None] + offs_j[None, :], mask=valid[:, None] & (offs_j < K // 2)[None, :], other=0)
    block_scale = tl.load((a_base + K // 2).to(tl.pointer_type(tl.float8e4nv))[:, None] + offs_g[None, :],
                          mask=valid[:, None] & (offs_g < K // 16)[None, :], other=0.0).to(tl.float32)
    scale = block_scale * glob[:, None]
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_M, BLOCK_K // 16, 8)), (BLOCK_M, BLOCK_K // 2))
    low = (e2m1_to_float(packed & 0xF) * scale).to(tl.bfloat16)
    high = (e2m1_to_float(packed >> 4) * scale).to(tl.bfloat16)
    return low, high


@triton.jit
def _tile_coordinates(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile index -> (M block, N tile, K slice): K slices outermost, then groups of GROUP_M M blocks in
    which the M block varies fastest."""
    tiles_per_slice = num_m * num_n
    pid_k = tile // tiles_per_slice
    tile = tile % tiles_per_slice
    group = tile // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    within = tile % (GROUP_M * num_n)
    return first_m + within % group_size, within // group_size, pid_k


@triton.jit
def _dot_k_range(a_ptr, a_scale_ptr, w_base, w_scale_base, w_global_base, a_rows, valid, offs_n, n_ok,
                 k_lo, k_hi, K, n_part, stride_am, stride_as, stride_wn, stride_wsn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 FORMAT: tl.constexpr, PRECISION: tl.constexpr, TILE_IN_ONE_SCALE_BLOCK: tl.constexpr = False,
                 SWAP_AB: tl.constexpr = False, NIBBLES_TO_BF16: tl.constexpr = False, USE_ASM: tl.constexpr = False,
                 EVEN_K: tl.constexpr = False, A_NVFP4: tl.constexpr = False):
    """sum over k in [k_lo, k_hi) of a[a_rows, k] * W[offs_n, k], in fp32. A_NVFP4 (bf16 or NVFP4 weights): a_ptr
    holds NVFP4 token rows (stride_am bytes apart), turned into bf16 here (_nvfp4_rows_low_high).
    TILE_IN_ONE_SCALE_BLOCK (FP8): the N tile lies in one 128-row weight scale block, so each K step's weight scale is
    one number. SWAP_AB: the product is computed transposed, W's tile times a's (acc [BLOCK_N, BLOCK_M]), so that a
    few rows still feed the tensor cores' wide wgmma, the weights filling its 64-row side. NIBBLES_TO_BF16 (NVFP4, bf16 activations): codes
    become bf16 by bit operations (in PTX with USE_ASM), the block scale multiplies them in bf16 exactly, and the global
    scale multiplies the sum."""
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if A_NVFP4:
        a_base = a_ptr + a_rows * stride_am
        a_glob = tl.load((a_base + K // 2 + K // 16).to(tl.pointer_type(tl.float32)), mask=valid, other=0.0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if FORMAT == 2 and NIBBLES_TO_BF16:  # NVFP4 with bf16 activations: even and odd elements apart, no interleave
            w_even, w_odd = _nvfp4_even_odd(w_base, w_scale_base, offs_n, n_ok, k0, K, stride_wn, stride_wsn,
                                            BLOCK_N, BLOCK_K, USE_ASM, EVEN_K)
            if A_NVFP4:  # the low nibbles are the even elements
                a_even, a_odd = _nvfp4_rows_low_high(a_base, a_glob, valid, k0, K, BLOCK_M, BLOCK_K)
            else:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                if EVEN_K:
                    a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :], mask=valid[:, None], other=0.0)
                else:
                    a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :],
                                mask=valid[:, None] & (offs_k < K)[None, :], other=0.0)
                a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
            if SWAP_AB:
                acc = tl.dot(w_even, tl.trans(a_even), acc)
                acc = tl.dot(w_odd, tl.trans(a_odd), acc)
            else:
                acc = tl.dot(a_even, tl.trans(w_even), acc)
                acc = tl.dot(a_odd, tl.trans(w_odd), acc)
        elif FORMAT == 2:  # NVFP4, W4A16: byte j of a weight row holds elements 2j (low nibble) and 2j + 1
            offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            packed = tl.load(w_base + offs_n[:, None] * stride_wn + offs_j[None, :],
                             mask=n_ok[:, None] & (offs_j < K // 2)[None, :], other=0)
            codes = tl.interleave(packed & 0xF, packed >> 4)  # [BLOCK_N, BLOCK_K] in k order
            offs_g = k0 // 16 + tl.arange(0, BLOCK_K // 16)  # one E4M3 scale per 16 elements, broadcast below
            group_scale = tl.load(w_scale_base + offs_n[:, None] * stride_wsn + offs_g[None, :],
                                  mask=n_ok[:, None] & (offs_g < K // 16)[None, :], other=0.0).to(tl.float32)
            part_scale = tl.load(w_global_base + offs_n // n_part, mask=n_ok, other=0.0)
            group_scale = group_scale * part_scale[:, None]
            scale = tl.reshape(tl.broadcast_to(group_scale[:, :, None], (BLOCK_N, BLOCK_K // 16, 16)), (BLOCK_N, BLOCK_K))
            if A_NVFP4:
                a_low, a_high = _nvfp4_rows_low_high(a_base, a_glob, valid, k0, K, BLOCK_M, BLOCK_K)
                a = tl.interleave(a_low, a_high)
            else:
                a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :],
                            mask=valid[:, None] & k_ok[None, :], other=0.0)
            w = (e2m1_to_float(codes) * scale).to(a.dtype)
            if SWAP_AB:
                acc += tl.dot(w, tl.trans(a), input_precision=PRECISION)
            else:
                acc += tl.dot(a, tl.trans(w), input_precision=PRECISION)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            if A_NVFP4:  # bf16 weights
                a_low, a_high = _nvfp4_rows_low_high(a_base, a_glob, valid, k0, K, BLOCK_M, BLOCK_K)
                a = tl.interleave(a_low, a_high)
            else:
                a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :], mask=valid[:, None] & k_ok[None, :],
                            other=0.0)
            if SWAP_AB:  # W's tile [BLOCK_N, BLOCK_K]
                w = tl.load(w_base + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                            other=0.0)
            else:  # W's tile transposed, [BLOCK_K, BLOCK_N]
                w = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :],
                            other=0.0)
            if FORMAT == 3:  # 16-bit activations, quantized here: this 128-wide K step is one activation group
                a, a_scale = quantize_e4m3_group(a.to(tl.float32), 1)
            elif FORMAT == 1:
                a_scale = tl.load(a_scale_ptr + a_rows * stride_as + k0 // 128, mask=valid, other=0.0)
            if FORMAT == 1 or FORMAT == 3:  # FP8 W8A8: this K step lies in one 128-wide scale block (BLOCK_K divides 128)
                if TILE_IN_ONE_SCALE_BLOCK:  # one multiply a row, one FMA an element
                    first_n = tl.min(offs_n, axis=0)
                    n_block = (first_n // n_part) * tl.cdiv(n_part, 128) + (first_n % n_part) // 128
                    w_scale = tl.load(w_scale_base + n_block * stride_wsn + k0 // 128)
                    if SWAP_AB:
                        acc += tl.dot(w, tl.trans(a)) * (a_scale * w_scale)[None, :]
                    else:
                        acc += tl.dot(a, w) * (a_scale * w_scale)[:, None]
                else:
                    n_block = (offs_n // n_part) * tl.cdiv(n_part, 128) + (offs_n % n_part) // 128
                    w_scale = tl.load(w_scale_base + n_block * stride_wsn + k0 // 128, mask=n_ok, other=0.0)
                    if SWAP_AB:
                        acc += tl.dot(w, tl.trans(a)) * (w_scale[:, None] * a_scale[None, :])
                    else:
                        acc += tl.dot(a, w) * (a_scale[:, None] * w_scale[None, :])
            elif SWAP_AB:
                acc += tl.dot(w, tl.trans(a), input_precision=PRECISION)
            else:
                acc += tl.dot(a, w, input_precision=PRECISION)
    if FORMAT == 2 and NIBBLES_TO_BF16:  # each part's global scale, and the 2^-62 the bf16 weights carried
        part_scale = tl.load(w_global_base + offs_n // n_part, mask=n_ok, other=0.0) * 4611686018427387904.0
        if SWAP_AB:
            acc = acc * part_scale[:, None]
        else:
            acc = acc * part_scale[None, :]
    return acc


@triton.jit(do_not_specialize=["num_rows"])  # these vary from step to step
def _moe_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, w_global_ptr, out_ptr, row_weight_ptr,
    sorted_rows_ptr, block_expert_ptr, num_padded_ptr,
    N, K, num_rows, rows_per_a_row, n_part,
    stride_am, stride_as, stride_we, stride_wn, stride_wse, stride_wsn, stride_ge, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    FORMAT: tl.constexpr, WEIGHTED: tl.constexpr, PRECISION: tl.constexpr, DENSE: tl.constexpr = False,
    TILE_IN_ONE_SCALE_BLOCK: tl.constexpr = False, SWAP_AB: tl.constexpr = False,
    NIBBLES_TO_BF16: tl.constexpr = False, USE_ASM: tl.constexpr = False, EVEN_K: tl.constexpr = False,
    partials_ptr=None, arrivals_ptr=None, REDUCE_IN_KERNEL: tl.constexpr = False, A_NVFP4: tl.constexpr = False,
):
    """Each program takes tiles program_id, + num_programs, ... among the tiles in use (M blocks below
    num_padded): one tile each for a full grid, several for a persistent one. DENSE: one weight matrix
    and the rows in order (a dense linear layer): no layout is read. SPLIT_K > 1: each K slice's partial sum is added
    atomically into out (fp32 zeros), or with REDUCE_IN_KERNEL written to partials, the last slice of a tile to
    arrive adding them up (_add_up_partials)."""
    if DENSE:
        num_m = tl.cdiv(num_rows, BLOCK_M)
    else:
        num_m = tl.load(num_padded_ptr) // BLOCK_M
    num_n = tl.cdiv(N, BLOCK_N)
    k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    for tile in range(tl.program_id(0), num_m * num_n * SPLIT_K, tl.num_programs(0)):
        pid_m, pid_n, pid_k = _tile_coordinates(tile, num_m, num_n, GROUP_M)
        if DENSE:
            expert = 0
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        else:
            expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
            rows = tl.load(sorted_rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = rows < num_rows
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = _dot_k_range(a_ptr, a_scale_ptr, w_ptr + expert * stride_we, w_scale_ptr + expert * stride_wse,
                           w_global_ptr + expert * stride_ge, (rows // rows_per_a_row).to(tl.int64), valid,
                           offs_n, n_ok, pid_k * k_span, tl.minimum(K, (pid_k + 1) * k_span), K, n_part,
                           stride_am, stride_as, stride_wn, stride_wsn,
                           BLOCK_M, BLOCK_N, BLOCK_K, FORMAT, PRECISION, TILE_IN_ONE_SCALE_BLOCK, SWAP_AB,
                           NIBBLES_TO_BF16, USE_ASM, EVEN_K, A_NVFP4)
        if SWAP_AB:
            acc = tl.trans(acc)
        if WEIGHTED:
            acc = acc * tl.load(row_weight_ptr + rows, mask=valid, other=0.0)[:, None]
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        if SPLIT_K > 1 and REDUCE_IN_KERNEL:
            acc, last = _add_up_partials(acc, partials_ptr, arrivals_ptr, pid_m, pid_n, pid_k, num_m, num_n,
                                         BLOCK_M, BLOCK_N, SPLIT_K)
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :] & last)
        elif SPLIT_K > 1:  # out is an fp32 buffer of zeros
            tl.atomic_add(out, acc, mask=valid[:, None] & n_ok[None, :])
        else:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _add_up_partials(acc, partials_ptr, arrivals_ptr, pid_m, pid_n, pid_k, num_m, num_n, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """K slice pid_k's partial sum of tile (pid_m, pid_n) -> (the tile's sum over its slices in slice order, whether
    this program holds it: the last slice to arrive). Each slice stores its partial in partials (fp32 [SPLIT_K,
    num_m * BLOCK_M, num_n * BLOCK_N]), then counts itself in arrivals[tile] (int32, zero before; released and acquired
    at GPU scope, after a barrier: CUTLASS's semaphore pattern); the last reads the others' through L2 and sets the
    count back to zero for the next launch. Nothing waits, so any grid order is safe."""
    width = num_n * BLOCK_N
    offs = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None] * width
            + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :])
    slice_size = (num_m * BLOCK_M).to(tl.int64) * width
    tl.store(partials_ptr + pid_k * slice_size + offs, acc)
    tl.debug_barrier()  # every thread's part stored before the count goes up
    tile = pid_m * num_n + pid_n
    last = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
    total = tl.zeros_like(acc)
    for k in tl.static_range(SPLIT_K):
        part = tl.load(partials_ptr + k * slice_size + offs, mask=last & (k != pid_k), other=0.0, cache_modifier=".cg")
        total += tl.where(k == pid_k, acc, part)
    tl.store(arrivals_ptr + tile, 0, mask=last)
    return total, last


# Dense split-K: the slices' sum made by the last slice to arrive (one kernel) instead of fp32 atomics into zeros and
# a copy (three kernels; still the way under a graph captured before any counters exist, and for grouped GEMMs).
# On an H100, DeepSeek-V2-Lite batch 1 decode steps (p50): FP8 4.18 -> 4.06 ms, NVFP4 4.20 -> 4.16 (docs/perf.md).
# MOESERVE_SPLIT_K=atomic turns it off (bench latency A/B).
_SPLIT_K_SUMS = ("atomic", "in-kernel")
if os.environ.get("MOESERVE_SPLIT_K", "in-kernel") not in _SPLIT_K_SUMS:
    raise ValueError(f"MOESERVE_SPLIT_K must be atomic or in-kernel, got {os.environ['MOESERVE_SPLIT_K']!r}")
SPLIT_K_IN_KERNEL = os.environ.get("MOESERVE_SPLIT_K", "in-kernel") == "in-kernel"


def weight_format(weight) -> int:
    if isinstance(weight, Fp8BlockWeight):
        return FP8
    if isinstance(weight, Nvfp4Weight):
        return NVFP4
    return BF16


def moe_gemm(a: torch.Tensor, a_scale: torch.Tensor | None, weight, layout: BlockLayout, out: torch.Tensor,
             rows_per_a_row: int, row_weights: torch.Tensor | None = None, config: GemmConfig = GemmConfig()) -> None:
    """out[row] (row in the layout) = a[row // rows_per_a_row] @ W[expert]^T, times row_weights[row] if given.
    weight: [E, N, K] tensor, or a QuantizedWeight of shape [E, N, K] or [E, 2, N/2, K] (gate and up).
    Rows outside the layout are left alone, except with split-K, which writes them as 0."""
    _launch(a, a_scale, weight, out, row_weights, config, layout.sorted_rows, layout.block_expert,
            layout.num_padded, layout.sorted_rows.numel(), layout.num_rows, rows_per_a_row, dense=False)


def dense_gemm(a: torch.Tensor, a_scale: torch.Tensor | None, weight, out: torch.Tensor, config: GemmConfig) -> None:
    """out = a @ W^T for one matrix W [N, K] (a tensor or a QuantizedWeight: FP8 128x128 blocks with a's 1x128
    FP8 scales, or with 16-bit a and no scales, quantized in the kernel; or NVFP4): the grouped GEMM's
    kernel with every row in order, reading the stored format."""
    one_expert = _OneMatrix(weight) if hasattr(weight, "format") else weight.unsqueeze(0)
    rows = a.shape[0]
    padded = triton.cdiv(rows, config.block_m) * config.block_m
    _launch(a, a_scale, one_expert, out, None, config, out, out, out, padded, rows, 1, dense=True)


class _OneMatrix:
    """A [N, K] QuantizedWeight seen as a stack of one matrix, as the grouped GEMM reads experts."""

    def __init__(self, weight):
        self.inner, self.shape = weight, (1, *weight.shape)
        self.block = getattr(weight, "block", None)

    def __getattr__(self, name):  # values / scale / packed / block_scale / global_scale
        return getattr(self.inner, name)


def _weight_operands(weight, fmt: int, num_experts: int, n: int, k: int, config: GemmConfig, dummy: torch.Tensor):
    """(w, w_scale, w_global) as the kernel indexes them: [E, N, K or K/2], [E, scale rows, scale cols], [E, parts]."""
    if fmt == BF16:
        return weight, dummy.view(1, 1, 1), dummy
    if fmt in (FP8, FP8_QUANTIZING):
        if fmt == FP8_QUANTIZING and config.block_k != FP8_BLOCK:
            raise ValueError("quantizing the activations inside the FP8 GEMM needs BLOCK_K = 128 (one group a step)")
        if config.block_k > FP8_BLOCK or FP8_BLOCK % config.block_k or weight.block != (FP8_BLOCK, FP8_BLOCK):
            raise ValueError("the FP8 grouped GEMM needs 128x128 weight blocks and BLOCK_K dividing 128")
        return weight.values.view(num_experts, n, k), weight.scale.view(num_experts, -1, weight.scale.shape[-1]), dummy
    return (weight.packed.view(num_experts, n, k // 2), weight.block_scale.view(num_experts, n, k // 16),
            weight.global_scale.reshape(num_experts, -1))


def _nvfp4_operand(a: Nvfp4Activations, fmt: int, weight) -> torch.Tensor:
    """NVFP4 token rows as the A operand: their bytes, checked for what the kernel's decode assumes."""
    weight_dtype = getattr(weight, "dtype", torch.bfloat16)  # quantized weights: their products are bf16 here
    if fmt not in (BF16, NVFP4) or a.dtype != torch.bfloat16 or weight_dtype != torch.bfloat16:
        raise ValueError(f"NVFP4 activations go into bf16 or NVFP4 weights with bf16 activations, got {a.dtype} "
                         "activations and these weights: dequantize them first")
    if a.hidden % 128 or a.rows.stride(-1) != 1 or a.rows.shape[1] < a.hidden // 2 + a.hidden // 16 + 4:
        raise ValueError(f"NVFP4 token rows of hidden size {a.hidden} need a multiple of 128 and "
                         f"{a.hidden // 2 + a.hidden // 16 + 4} contiguous bytes a row, got {tuple(a.rows.shape)} "
                         f"with strides {a.rows.stride()}")
    return a.rows


def _launch(a, a_scale, weight, out, row_weights, config: GemmConfig, sorted_rows, block_expert, num_padded,
            row_slots: int, num_rows: int, rows_per_a_row: int, dense: bool) -> None:
    fmt = weight_format(weight.inner if isinstance(weight, _OneMatrix) else weight)
    a_nvfp4 = isinstance(a, Nvfp4Activations)
    if a_nvfp4:
        a = _nvfp4_operand(a, fmt, weight)
    if fmt == FP8 and a_scale is None:  # 16-bit activations for FP8 weights: the kernel quantizes them
        if a.dtype == torch.float8_e4m3fn:
            raise ValueError("FP8 activations need their scales")
        fmt = FP8_QUANTIZING
    shape = weight.shape
    num_experts, k = shape[0], shape[-1]
    n_part = shape[-2]
    n = n_part * (2 if len(shape) == 4 else 1)
    dummy = a.new_empty(1, dtype=torch.float32)
    w, w_scale, w_global = _weight_operands(weight, fmt, num_experts, n, k, config, dummy)
    a_scale = a_scale if a_scale is not None else dummy.view(1, 1)
    num_m, num_n = row_slots // config.block_m, triton.cdiv(n, config.block_n)
    arrivals = tile_arrivals(a.device, num_m * num_n) if config.split_k > 1 and dense and SPLIT_K_IN_KERNEL else None
    in_kernel = arrivals is not None
    target = out if config.split_k == 1 or in_kernel else torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    partials = (a.new_empty(config.split_k * row_slots * num_n * config.block_n, dtype=torch.float32) if in_kernel
                else dummy)
    arrivals = arrivals if in_kernel else dummy
    max_tiles = num_m * num_n * config.split_k
    grid = (min(max_tiles, persistent_programs(a.device)) if config.persistent else max_tiles,)
    _moe_gemm_kernel[grid](
        a, a_scale, w, w_scale, w_global, target, row_weights if row_weights is not None else dummy,
        sorted_rows, block_expert, num_padded,
        n, k, num_rows, rows_per_a_row, n_part,
        a.stride(0), a_scale.stride(0), w.stride(0), w.stride(1), w_scale.stride(0), w_scale.stride(1),
        w_global.stride(0) if w_global.dim() > 1 else 0, target.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, SPLIT_K=config.split_k,
        FORMAT=fmt, WEIGHTED=row_weights is not None,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",  # fp32 models stay fp32 (no TF32)
        DENSE=dense, TILE_IN_ONE_SCALE_BLOCK=fmt in (FP8, FP8_QUANTIZING) and tile_in_one_scale_block(
            n_part, config, parts=2 if len(shape) == 4 else 1),
        SWAP_AB=config.swap_ab, NIBBLES_TO_BF16=fmt == NVFP4 and (a.dtype == torch.bfloat16 or a_nvfp4)
        and config.block_k >= 32,
        USE_ASM=bf16x2_multiply(a.device), EVEN_K=k % config.block_k == 0,
        partials_ptr=partials, arrivals_ptr=arrivals, REDUCE_IN_KERNEL=in_kernel, A_NVFP4=a_nvfp4,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if target is not out:
        out.copy_(target)


_arrivals: dict[torch.device, list[torch.Tensor]] = {}


def tile_arrivals(device: torch.device, tiles: int) -> torch.Tensor | None:
    """Zeroed int32 counters, at least `tiles`, for the in-kernel split-K sum on `device`; each launch leaves them zero
    again, so launches in one stream (the engine's compute stream, its graph replays) share them. Made and zeroed only
    outside graph capture (a capture records a fill without running it): while capturing with none big enough, None
    (the caller sums with atomics). Outgrown counters stay alive for the graphs captured with them."""
    made = _arrivals.setdefault(device, [])
    if made and made[-1].numel() >= tiles:
        return made[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    made.append(torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device))
    return made[-1]


@functools.cache
def bf16x2_multiply(device: torch.device) -> bool:
    """Whether the NVFP4 conversion's PTX (mul.rn.bf16x2, sm_90 and later) compiles there; else its Triton form."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def tile_in_one_scale_block(n_part: int, config: GemmConfig, parts: int = 2) -> bool:
    """Whether every N tile lies inside one 128-row FP8 weight block. Tiles of a width dividing 128 start on multiples
    of it, so in one matrix they always do (its last block may be partial: a fused q + kv_a); in a gate_up pair
    (parts = 2) only when each part fills whole blocks."""
    return FP8_BLOCK % config.block_n == 0 and (parts == 1 or n_part % FP8_BLOCK == 0)


@functools.cache
def persistent_programs(device: torch.device) -> int:
    """Two CTAs per SM on a GPU; a few programs in the CPU interpreter (so its loop runs several tiles)."""
    if device.type != "cuda":
        return 3
    return 2 * multiprocessors(device)
