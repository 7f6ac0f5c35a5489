"""Expert-parallel transport kernels over peer memory: each takes a table of addresses (int64), one per EP rank, of
that rank's buffer: the dispatch writes into peers' receive areas directly (one-sided puts), the combine reads each
token's results where the experts of its ranks wrote them (one-sided gets, summed as they arrive). On one GPU the
addresses are R buffers of the same device (virtual ranks); across GPUs they are the peer pointers of symmetric memory.
Rows move as 32-bit words (every row size is a multiple of 4 bytes).
References: moeserve.distributed.ep.peer_to_peer (what each step means) and the all-to-all dispatcher (same results)."""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeserve.kernels.activation import (FP8_GROUP, max_keeping_nan, min_keeping_nan, quantize_e4m3_group,
                                         round_to_e4m3_grid)
from moeserve.kernels.moe_gemm import e2m1_to_float

WORDS_PER_PROGRAM = 1024


@triton.jit
def _peer(table_ptr, rank, dtype: tl.constexpr):
    """Rank's buffer: 16-byte aligned (as every allocation), which the stores through it need to know to write 16
    bytes at a time."""
    return tl.multiple_of(tl.load(table_ptr + rank).to(tl.pointer_type(dtype)), 16)


@triton.jit
def _rows_at_ranks(local_index_ptr, counts_ptr, recv_table_ptr, tokens, valid, row_bytes, me, region_rows,
                   EP: tl.constexpr, EP_POW2: tl.constexpr, LOW_LATENCY: tl.constexpr):
    """Addresses (int64 [ROWS, EP_POW2]) of the tokens' rows (those not `valid` going nowhere) in every rank d's
    receive area, 0 where a token does not go there: its index among this rank's rows to d, after this rank's fixed
    region start (low latency) or after the rows the ranks before it send d (this rank's count matrix, where every
    rank has put its row). A put loads them all before its first store: a load placed after a store issues after it,
    so loading each rank's row just before storing to it would put a load's latency between every two ranks."""
    dests = tl.arange(0, EP_POW2)
    in_ep = dests < EP
    index = tl.load(local_index_ptr + tokens[:, None] * EP + dests[None, :], mask=valid[:, None] & in_ep[None, :],
                    other=-1).to(tl.int64)
    if LOW_LATENCY:
        first = tl.zeros((EP_POW2,), dtype=tl.int64) + me * region_rows
    else:
        sources = tl.arange(0, EP_POW2)[:, None]
        counts = tl.load(counts_ptr + sources * EP + dests[None, :], mask=(sources < me) & in_ep[None, :], other=0)
        first = tl.sum(counts, axis=0).to(tl.int64)
    bases = tl.load(recv_table_ptr + dests, mask=in_ep, other=0)
    return tl.where(index >= 0, bases[None, :] + (first[None, :] + index) * row_bytes, 0)


@triton.jit
def _row_at(addresses, dest, EP_POW2: tl.constexpr, dtype: tl.constexpr):
    """Column dest of _rows_at_ranks: the tokens' rows at rank dest as [ROWS, 1] pointers to dtype (16-byte aligned:
    the areas are, and rows are a multiple of 16 bytes long), and [ROWS, 1]: whether each token goes there."""
    address = tl.sum(tl.where(tl.arange(0, EP_POW2)[None, :] == dest, addresses, 0), axis=1)
    return tl.multiple_of(address.to(tl.pointer_type(dtype)), 16)[:, None], (address != 0)[:, None]


@triton.jit
def _put_counts_kernel(counts_table_ptr, my_counts_ptr, me, EP: tl.constexpr, EP_POW2: tl.constexpr):
    """Row `me` of every peer's [EP, EP] count matrix <- this rank's rows for each destination."""
    peer = tl.program_id(0)
    offs = tl.arange(0, EP_POW2)
    counts = tl.load(my_counts_ptr + offs, mask=offs < EP)
    tl.store(_peer(counts_table_ptr, peer, tl.int32) + me * EP + offs, counts, mask=offs < EP)


@triton.jit
def _route_block_kernel(ids_ptr, weights_ptr, replica_slots_ptr, replica_count_ptr, local_index_ptr, meta_ptr,
                        block_counts_ptr, num_tokens, me, slots_per_rank, stride_replicas,
                        EP: tl.constexpr, EP_POW2: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                        K_POW2: tl.constexpr):
    """The send side's layout of token block b (program b): each (token, k)'s replica (token + me mod its count), the
    ranks each token goes to, its index among the block's rows to each rank, the metadata rows [K slots (-1: not
    there) | K weights] per (token, rank), and the block's row count for each rank."""
    block = tl.program_id(0)
    ranks = tl.arange(0, EP_POW2)
    rank_ok = ranks < EP
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < num_tokens
    ok = token_ok[:, None] & rank_ok[None, :]
    ks = tl.arange(0, K_POW2)
    pair_ok = token_ok[:, None] & (ks < TOP_K)[None, :]  # [BLOCK_T, K_POW2]: every (token, k) loaded at once
    expert = tl.load(ids_ptr + tokens[:, None] * TOP_K + ks[None, :], mask=pair_ok, other=0).to(tl.int64)
    replicas = tl.load(replica_count_ptr + expert, mask=pair_ok, other=1)
    physical = tl.load(replica_slots_ptr + expert * stride_replicas + (tokens[:, None] + me) % replicas, mask=pair_ok,
                       other=0)
    weight = tl.load(weights_ptr + tokens[:, None] * TOP_K + ks[None, :], mask=pair_ok, other=0.0).to(tl.float32)
    hit = ((physical // slots_per_rank)[:, None, :] == ranks[None, :, None]) & pair_ok[:, None, :]  # [T, EP, K]
    goes = tl.max(hit.to(tl.int32), axis=2)
    meta_rows = meta_ptr + ((tokens.to(tl.int64)[:, None] * EP + ranks[None, :]) * (2 * TOP_K))[:, :, None]
    store_ok = ok[:, :, None] & (ks < TOP_K)[None, None, :]
    tl.store(meta_rows + ks[None, None, :], tl.where(hit, (physical % slots_per_rank)[:, None, :], -1).to(tl.int32),
             mask=store_ok)
    tl.store(meta_rows.to(tl.pointer_type(tl.float32)) + TOP_K + ks[None, None, :],
             tl.where(hit, weight[:, None, :], 0.0), mask=store_ok)
    goes = tl.where(ok, goes, 0)
    index = tl.cumsum(goes, axis=0) - 1
    tl.store(local_index_ptr + tokens[:, None] * EP + ranks[None, :], tl.where(goes > 0, index, -1), mask=ok)
    tl.store(block_counts_ptr + block * EP + ranks, tl.sum(goes, axis=0), mask=rank_ok)


@triton.jit
def _route_offsets_kernel(local_index_ptr, block_counts_ptr, counts_table_ptr, num_tokens, num_blocks, me,
                          EP: tl.constexpr, EP_POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCKS_POW2: tl.constexpr):
    """Block b's row indices made this rank's (program b adds the rows the blocks before it send each rank); program
    0 puts this rank's counts (all blocks') into row `me` of every peer's count matrix."""
    block = tl.program_id(0)
    ranks = tl.arange(0, EP_POW2)
    rank_ok = ranks < EP
    blocks = tl.arange(0, BLOCKS_POW2)
    counts = tl.load(block_counts_ptr + blocks[:, None] * EP + ranks[None, :],
                     mask=(blocks < num_blocks)[:, None] & rank_ok[None, :], other=0)
    before = tl.sum(tl.where((blocks < block)[:, None], counts, 0), axis=0)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = (tokens < num_tokens)[:, None] & rank_ok[None, :]
    index_ptrs = local_index_ptr + tokens[:, None] * EP + ranks[None, :]
    index = tl.load(index_ptrs, mask=ok, other=-1)
    tl.store(index_ptrs, tl.where(index >= 0, index + before[None, :], -1), mask=ok)
    if block == 0:
        total = tl.sum(counts, axis=0)
        for peer in range(EP):
            tl.store(_peer(counts_table_ptr, peer, tl.int32) + me * EP + ranks, total, mask=rank_ok)


@triton.jit
def _put_rows_kernel(payload_ptr, meta_ptr, local_index_ptr, counts_ptr, recv_table_ptr, num_tokens, payload_words,
                     meta_words, row_words, me, region_rows, EP: tl.constexpr, EP_POW2: tl.constexpr, LOW_LATENCY: tl.constexpr,
                     BLOCK: tl.constexpr, META_BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """Program (p, c): chunk c of tokens p * ROWS onwards, ROWS at a time, every P * ROWS (P programs along axis 0),
    each read once, into its row of every rank it goes to (rows of row_words words: payload, metadata, padding);
    chunk 0's programs also put the token's metadata for each of them."""
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < payload_words
    for first in range(tl.program_id(0) * ROWS, num_tokens, tl.num_programs(0) * ROWS):
        tokens = (first + tl.arange(0, ROWS)).to(tl.int64)
        valid = tokens < num_tokens
        addresses = _rows_at_ranks(local_index_ptr, counts_ptr, recv_table_ptr, tokens, valid, row_words * 4, me,
                                   region_rows, EP, EP_POW2, LOW_LATENCY)
        words = tl.load(payload_ptr + tokens[:, None] * payload_words + offs[None, :], mask=valid[:, None] & ok[None, :])
        for dest in range(EP):
            rows, goes = _row_at(addresses, dest, EP_POW2, tl.int32)
            tl.store(rows + offs[None, :], words, mask=goes & ok[None, :])
        if chunk == 0:
            _put_meta(meta_ptr, addresses, tokens, payload_words * 4, meta_words, EP, EP_POW2, META_BLOCK)


@triton.jit
def _put_meta(meta_ptr, addresses, tokens, payload_bytes, meta_words, EP: tl.constexpr, EP_POW2: tl.constexpr,
              BLOCK: tl.constexpr):
    """Tokens' metadata for each rank d they go to (addresses: _rows_at_ranks), after the payload of their rows
    there, for all the ranks at once."""
    offs = tl.arange(0, BLOCK)[None, None, :]
    dests = tl.arange(0, EP_POW2)[None, :, None]
    goes = (addresses != 0)[:, :, None] & (offs < meta_words)
    meta = tl.load(meta_ptr + (tokens[:, None, None] * EP + dests) * meta_words + offs, mask=goes)
    tl.store((addresses[:, :, None] + payload_bytes).to(tl.pointer_type(tl.int32)) + offs, meta, mask=goes)


@triton.jit
def _put_rows_fp8_kernel(x_ptr, meta_ptr, local_index_ptr, counts_ptr, recv_table_ptr, num_tokens, hidden, meta_words,
                         row_bytes, me, region_rows, EP: tl.constexpr, EP_POW2: tl.constexpr,
                         LOW_LATENCY: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                         ROWS: tl.constexpr):
    """Tokens p * ROWS onwards, ROWS at a time, every P * ROWS (program p of P), each quantized once to FP8 1x128 (as
    quantize_fp8_groups), CHUNK values (CHUNK / 128 groups, a divisor of hidden) at a time, to every rank it goes to:
    its row there gets [H codes | H/128 fp32 scales | its metadata for d]."""
    payload_bytes = hidden + hidden // GROUP * 4
    for first in range(tl.program_id(0) * ROWS, num_tokens, tl.num_programs(0) * ROWS):
        tokens = (first + tl.arange(0, ROWS)).to(tl.int64)
        valid = tokens < num_tokens
        addresses = _rows_at_ranks(local_index_ptr, counts_ptr, recv_table_ptr, tokens, valid, row_bytes, me,
                                   region_rows, EP, EP_POW2, LOW_LATENCY)
        for start in range(0, hidden, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            x = tl.load(x_ptr + tokens[:, None] * hidden + offs[None, :], mask=valid[:, None], other=0.0)
            values, scales = quantize_e4m3_group(tl.reshape(x.to(tl.float32), (ROWS * CHUNK // GROUP, GROUP)), 1)
            values = tl.reshape(values, (ROWS, CHUNK))
            scales = tl.reshape(scales, (ROWS, CHUNK // GROUP))
            scale_offs = start // GROUP + tl.arange(0, CHUNK // GROUP)
            for dest in range(EP):
                rows, goes = _row_at(addresses, dest, EP_POW2, tl.uint8)
                tl.store(rows.to(tl.pointer_type(tl.float8e4nv)) + offs[None, :], values, mask=goes)
                tl.store((rows + hidden).to(tl.pointer_type(tl.float32)) + scale_offs[None, :], scales, mask=goes)
        _put_meta(meta_ptr, addresses, tokens, payload_bytes, meta_words, EP, EP_POW2, BLOCK)


@triton.jit
def _e2m1_codes(scaled):
    """Scaled values -> E2M1 codes (sign bit 8), to the nearest magnitude, ties to the even code, saturating at 6, NaN to
    0: moeserve.quant.nvfp4.e2m1_codes. Below 2 the magnitudes step by 0.5: the index is 2m rounded to an integer
    (adding 1.5 * 2^23 leaves it in the low mantissa bits). From 2 on they are m rounded to one mantissa bit, ties to
    even (add 2^21 - 1 and the kept bit), and the index counts from 2.0's exponent (252 = 2 * 126)."""
    magnitude = tl.abs(scaled)
    below_two = (magnitude * 2.0 + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    bits = magnitude.to(tl.int32, bitcast=True)
    from_two = tl.minimum(((bits + 0x1FFFFF + ((bits >> 22) & 1)) >> 22) - 252, 7)
    index = tl.where(magnitude < 2.0, below_two, from_two) | ((scaled < 0).to(tl.int32) * 8)
    return tl.where(magnitude == magnitude, index, 0)


@triton.jit
def _put_rows_nvfp4_kernel(x_ptr, meta_ptr, local_index_ptr, counts_ptr, recv_table_ptr, num_tokens, hidden,
                           meta_words, row_bytes, me, region_rows, code_bytes, EP: tl.constexpr,
                           EP_POW2: tl.constexpr, LOW_LATENCY: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                           ROWS: tl.constexpr, WHOLE_ROW: tl.constexpr = False):
    """Tokens p * ROWS onwards, ROWS at a time, every P * ROWS (program p of P), each quantized once to NVFP4: CHUNK
    values a step (a divisor of hidden), or WHOLE_ROW: the row in one step of CHUNK >= hidden, masked. code_bytes:
    hidden / 2, an argument so that Triton sees it is a multiple of 16 (the masked code stores stay 16 bytes wide)."""
    for first in range(tl.program_id(0) * ROWS, num_tokens, tl.num_programs(0) * ROWS):
        tokens = (first + tl.arange(0, ROWS)).to(tl.int64)
        _put_tokens_nvfp4(x_ptr, meta_ptr, local_index_ptr, counts_ptr, recv_table_ptr, tokens, tokens < num_tokens,
                          hidden, meta_words, row_bytes, me, region_rows, code_bytes, EP, EP_POW2, LOW_LATENCY, CHUNK,
                          BLOCK, ROWS, WHOLE_ROW)


@triton.jit
def _put_tokens_nvfp4(x_ptr, meta_ptr, local_index_ptr, counts_ptr, recv_table_ptr, tokens, valid, hidden, meta_words,
                      row_bytes, me, region_rows, code_bytes, EP: tl.constexpr, EP_POW2: tl.constexpr,
                      LOW_LATENCY: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                      WHOLE_ROW: tl.constexpr):
    """Tokens (a vector of ROWS; those not `valid` skipped), each quantized once to NVFP4 (as the nvfp4 token format
    packs it: a global scale amax / 2688 per token (at least 2^-100), an E4M3 scale per 16 values, E2M1 codes two a
    byte), to every rank it goes to: its row there gets [H/2 code bytes | H/16 E4M3 scales | fp32 global scale | its
    metadata for d]. Steps of CHUNK values: a first pass for the amax, a second to quantize; WHOLE_ROW: one load
    serves both."""
    payload_bytes = hidden // 2 + hidden // 16 + 4
    addresses = _rows_at_ranks(local_index_ptr, counts_ptr, recv_table_ptr, tokens, valid, row_bytes, me, region_rows,
                               EP, EP_POW2, LOW_LATENCY)
    if WHOLE_ROW:
        blocks, block_amax = _block_amax(_load_values(x_ptr, tokens, valid, 0, hidden, CHUNK, WHOLE_ROW), ROWS, CHUNK)
        glob = _global_scale(tl.reduce(block_amax, 1, max_keeping_nan))
        packed, scale = _quantize_nvfp4_values(blocks, block_amax, glob, ROWS, CHUNK)
        _store_nvfp4_to_ranks(addresses, 0, packed, scale, hidden, code_bytes, EP, EP_POW2, CHUNK, WHOLE_ROW)
    else:
        amax = tl.zeros((ROWS,), dtype=tl.float32)
        for start in range(0, hidden, CHUNK):  # first pass: each token's amax
            v = tl.abs(_load_values(x_ptr, tokens, valid, start, hidden, CHUNK, WHOLE_ROW))
            amax = max_keeping_nan(amax, tl.reduce(v, 1, max_keeping_nan))
        glob = _global_scale(amax)
        for start in range(0, hidden, CHUNK):
            blocks, block_amax = _block_amax(_load_values(x_ptr, tokens, valid, start, hidden, CHUNK, WHOLE_ROW),
                                             ROWS, CHUNK)
            packed, scale = _quantize_nvfp4_values(blocks, block_amax, glob, ROWS, CHUNK)
            _store_nvfp4_to_ranks(addresses, start, packed, scale, hidden, code_bytes, EP, EP_POW2, CHUNK, WHOLE_ROW)
    tl.store((addresses + code_bytes + hidden // 16).to(tl.pointer_type(tl.float32)),
             tl.broadcast_to(glob[:, None], (ROWS, EP_POW2)), mask=addresses != 0)
    _put_meta(meta_ptr, addresses, tokens, payload_bytes, meta_words, EP, EP_POW2, BLOCK)


@triton.jit
def _load_values(x_ptr, tokens, valid, start, hidden, CHUNK: tl.constexpr, WHOLE_ROW: tl.constexpr):
    """Values start onwards of the tokens' rows, [ROWS, CHUNK] in fp32 (0 where not valid or past the row)."""
    v = tl.load(x_ptr + tokens[:, None] * hidden + start + tl.arange(0, CHUNK)[None, :],
                mask=valid[:, None] & _in_row(start, hidden, CHUNK, WHOLE_ROW), other=0.0)
    return v.to(tl.float32)


@triton.jit
def _global_scale(amax):
    """Each token's global scale: amax / (6 * 448), at least 2^-100 (moeserve.quant.nvfp4.MIN_GLOBAL_SCALE), 1 for a
    token of zeros, NaN for one with a NaN (amax is NaN)."""
    return tl.where(amax == 0, 1.0, max_keeping_nan(tl.math.div_rn(amax, 2688.0), 7.888609052210118e-31))


@triton.jit
def _block_amax(v, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    """v [ROWS, CHUNK] -> (v as [ROWS, CHUNK / 16, 16] blocks, each block's amax [ROWS, CHUNK / 16], NaN if it has
    one)."""
    blocks = tl.reshape(v, (ROWS, CHUNK // 16, 16))
    return blocks, tl.reduce(tl.abs(blocks), 2, max_keeping_nan)


@triton.jit
def _quantize_nvfp4_values(blocks, block_amax, glob, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    """Blocks of 16 values [ROWS, CHUNK / 16, 16] fp32 with their amax, under the tokens' global scales glob [ROWS] ->
    (codes two a byte [ROWS, CHUNK / 2] uint8, E4M3-valued block scales [ROWS, CHUNK / 16] fp32), as
    moeserve.quant.nvfp4.quantize_nvfp4: one division a block, then a multiplication a value."""
    raw = max_keeping_nan(tl.math.div_rn(block_amax, (glob * 6.0)[:, None]), 0.001953125)  # at least 2^-9
    scale = tl.where(block_amax == 0, 1.0, raw)
    scale = round_to_e4m3_grid(min_keeping_nan(scale, 448.0))
    reciprocal = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale * glob[:, None])
    low, high = tl.split(tl.reshape(_e2m1_codes(blocks * reciprocal[:, :, None]), (ROWS, CHUNK // 16, 8, 2)))
    return tl.reshape((low | (high << 4)).to(tl.uint8), (ROWS, CHUNK // 2)), scale


@triton.jit
def _store_nvfp4_to_ranks(addresses, start, packed, scale, hidden, code_bytes, EP: tl.constexpr,
                          EP_POW2: tl.constexpr, CHUNK: tl.constexpr, WHOLE_ROW: tl.constexpr):
    """A step's codes and block scales (values start onwards) into the tokens' rows at every rank they go to
    (addresses: _rows_at_ranks)."""
    for dest in range(EP):
        rows, goes = _row_at(addresses, dest, EP_POW2, tl.uint8)
        tl.store(rows + start // 2 + tl.arange(0, CHUNK // 2)[None, :], packed,
                 mask=goes & _in_row(start // 2, code_bytes, CHUNK // 2, WHOLE_ROW))
        tl.store((rows + code_bytes + start // 16).to(tl.pointer_type(tl.float8e4nv))
                 + tl.arange(0, CHUNK // 16)[None, :], scale.to(tl.float8e4nv),
                 mask=goes & _in_row(start // 16, hidden // 16, CHUNK // 16, WHOLE_ROW))


@triton.jit
def _in_row(first, row_items, ITEMS: tl.constexpr, WHOLE_ROW: tl.constexpr):
    """[1, ITEMS] mask of a step's items (values, code bytes or block scales) first onwards inside a row of row_items:
    all of them unless the step is a whole row padded to a power of two (no mask: the stores stay wide)."""
    if WHOLE_ROW:
        return (first + tl.arange(0, ITEMS) < row_items)[None, :]
    return tl.full((1, ITEMS), 1, tl.int1)


@triton.jit
def _pull_results_kernel(results_table_ptr, local_index_ptr, first_ptr, out_ptr, num_tokens, hidden, me, region_rows,
                         EP: tl.constexpr, LOW_LATENCY: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """out[t] = sum, in fp32 and in rank order, over the ranks d that token t went to of its result in d's results
    area: the row its dispatch put it in there, first[d] (low latency: me * region_rows) + local_index[t, d].
    Program (p, c): chunk c of tokens p * ROWS onwards, ROWS at a time, every P * ROWS."""
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < hidden
    for start in range(tl.program_id(0) * ROWS, num_tokens, tl.num_programs(0) * ROWS):
        tokens = (start + tl.arange(0, ROWS)).to(tl.int64)
        valid = tokens < num_tokens
        acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        for dest in tl.static_range(EP):
            index = tl.load(local_index_ptr + tokens * EP + dest, mask=valid, other=-1).to(tl.int64)
            if LOW_LATENCY:
                first = tl.zeros((), dtype=tl.int64) + me * region_rows
            else:
                first = tl.load(first_ptr + dest).to(tl.int64)
            results = _peer(results_table_ptr, dest, out_ptr.dtype.element_ty)
            part = tl.load(results + ((first + index) * hidden)[:, None] + offs[None, :],
                           mask=(index >= 0)[:, None] & ok[None, :], other=0.0)
            acc += part.to(tl.float32)
        tl.store(out_ptr + tokens[:, None] * hidden + offs[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & ok[None, :])


@triton.jit
def _nvfp4_tokens_kernel(rows_ptr, out_ptr, in_use_ptr, num_rows, hidden, row_stride, CHUNK: tl.constexpr,
                         ROWS: tl.constexpr, SOME_ROWS: tl.constexpr, USE_ASM: tl.constexpr = False):
    """Program (p, c): values c * CHUNK onwards of received rows p * ROWS onwards (NVFP4 tokens) -> out (as
    dequantize_nvfp4: value(code) * (block scale * global scale) in fp32, then rounded to out's dtype); with SOME_ROWS,
    nothing for a row whose in_use flag is 0. Byte j of a row's codes holds values 2j (low nibble) and 2j + 1: each
    byte becomes its two values in place (a 16-bit out gets them as one 32-bit word), so no value moves between
    threads. USE_ASM (bf16 out, a GPU): the bit operations of _code_pairs_times_scale_ptx."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = rows < num_rows
    if SOME_ROWS:
        ok = ok & (tl.load(in_use_ptr + rows, mask=ok, other=0) != 0)
        if tl.max(ok.to(tl.int32), axis=0) == 0:  # none of them holds a token (a low-latency region's unused end)
            return
    base = rows_ptr + rows.to(tl.int64) * row_stride  # [ROWS]
    glob = tl.load((base + hidden // 2 + hidden // 16).to(tl.pointer_type(tl.float32)), mask=ok)
    if USE_ASM:  # [ROWS, blocks of 16 values, their 8 bytes]: a block's scale loaded once
        blocks = tl.program_id(1) * (CHUNK // 16) + tl.arange(0, CHUNK // 16)
        pairs = blocks[:, None] * 8 + tl.arange(0, 8)[None, :]
        packed = tl.load(base[:, None, None] + pairs[None, :, :], mask=ok[:, None, None])
        block_scales = tl.load((base[:, None] + hidden // 2).to(tl.pointer_type(tl.float8e4nv)) + blocks[None, :],
                               mask=ok[:, None]).to(tl.float32)
        words = _code_pairs_times_scale_ptx(packed, tl.broadcast_to((block_scales * glob[:, None])[:, :, None],
                                                                     (ROWS, CHUNK // 16, 8)))
        out_words = (out_ptr + rows.to(tl.int64)[:, None, None] * hidden).to(tl.pointer_type(tl.int32))
        tl.store(out_words + pairs[None, :, :], words, mask=ok[:, None, None])
        return
    pairs = tl.program_id(1) * (CHUNK // 2) + tl.arange(0, CHUNK // 2)
    packed = tl.load(base[:, None] + pairs[None, :], mask=ok[:, None]).to(tl.int32)
    block_scales = tl.load((base[:, None] + hidden // 2).to(tl.pointer_type(tl.float8e4nv)) + (pairs // 8)[None, :],
                           mask=ok[:, None]).to(tl.float32)  # each byte's block of 16 values (the same 8 bytes)
    scales = block_scales * glob[:, None]
    low = (e2m1_to_float(packed & 15) * scales).to(out_ptr.dtype.element_ty)
    high = (e2m1_to_float(packed >> 4) * scales).to(out_ptr.dtype.element_ty)
    out_rows = out_ptr + rows.to(tl.int64)[:, None] * hidden
    if out_ptr.dtype.element_ty == tl.float32:
        tl.store(out_rows + 2 * pairs[None, :], low, mask=ok[:, None])
        tl.store(out_rows + 2 * pairs[None, :] + 1, high, mask=ok[:, None])
    else:  # 16-bit values: the pair as one word, the low value at the lower address
        word = ((low.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
                | (high.to(tl.int16, bitcast=True).to(tl.int32) << 16))
        tl.store(out_rows.to(tl.pointer_type(tl.int32)) + pairs[None, :], word, mask=ok[:, None])


_BYTE_TO_BF16_PAIR = """
        prmt.b32 b, $4, 0, 0x444{k};
        mul.lo.u32 t, b, 4097;
        shl.b32 m, t, 6;
        and.b32 m, m, 0x01C001C0;
        shl.b32 x, t, 12;
        lop3.b32 x, x, 0x80008000, m, 0xEA;
        shl.b32 lo, x, 16;
        and.b32 hi, x, 0xFFFF0000;
        mul.rn.f32 flo, lo, 0f7E800000;
        mul.rn.f32 fhi, hi, 0f7E800000;
        mul.rn.f32 flo, flo, ${scale};
        mul.rn.f32 fhi, fhi, ${scale};
        cvt.rn.bf16x2.f32 ${k}, fhi, flo;"""
_CODE_PAIRS_PTX = tl.constexpr("{ .reg .b32 b, t, m, x, lo, hi; .reg .f32 flo, fhi;" + "".join(
    _BYTE_TO_BF16_PAIR.format(k=k, scale=5 + k) for k in range(4)) + " }")  # bytes k = 0-3 of $4, scales $5-$8


@triton.jit
def _code_pairs_times_scale_ptx(packed, scale):
    """Bytes of two E2M1 codes (uint8) and each byte's fp32 scale -> one int32 a byte: bf16(low code * scale) in its
    low half, bf16(high code * scale) in its high half, each product rounded in fp32 first (as the torch unpack does).
    Four bytes at a time. PRMT takes byte k alone; adding a copy of it 12 bits up (b * 4097) puts the two codes 16
    bits apart; shifts, a mask and a LOP3 put each code's sign at bit 15 and its magnitude bits at bits 8-6 of its
    half: the bf16 number code * 2^-126 (subnormal for 0 and 0.5). Widened to fp32, it is multiplied by 2^126 (exact)
    and by the scale."""
    return tl.inline_asm_elementwise(asm=_CODE_PAIRS_PTX, constraints="=r,=r,=r,=r,r,r,r,r,r", args=[packed, scale],
                                     dtype=tl.int32, is_pure=True, pack=4)


NVFP4_RECEIVE_ROWS = 8  # rows a program of the NVFP4 receive converts at once
NVFP4_RECEIVE_PTX = True  # bf16 out on a GPU: the conversion in PTX (_code_pairs_times_scale_ptx). On an H100, 8 ranks
# x 4096 tokens: dispatch 2489 us with Triton's conversion 4 rows at once, 2401 / 2375 / 2366 in PTX 2 / 4 / 8 rows at
# once (on an H200 Triton's 4 rows had beaten 1 row, 2764 -> 2443; scripts/probes/ep_nvfp4_variants.py)


def nvfp4_tokens(payload: torch.Tensor, hidden: int, dtype: torch.dtype, rows_in_use: torch.Tensor | None = None,
                 rows_at_once: int | None = None) -> torch.Tensor:
    """payload: uint8 [R, >= H/2 + H/16 + 4], NVFP4 tokens as the nvfp4 token format lays them out (rows may be
    strided, as in a receive area) -> [R, H] in dtype. rows_in_use (bool [R]): only those rows are made; the others
    are left unwritten (a low-latency receive's rows that hold no token). rows_at_once: rows a program converts (a
    power of two; default NVFP4_RECEIVE_ROWS)."""
    rows = payload.shape[0]
    out = torch.empty(rows, hidden, dtype=dtype, device=payload.device)
    if rows:
        chunk = chunk_of(hidden)
        if rows_in_use is not None and (rows_in_use.shape != (rows,) or rows_in_use.dtype != torch.bool):
            raise ValueError(f"rows_in_use must be bool [{rows}], got {rows_in_use.dtype} {tuple(rows_in_use.shape)}")
        in_use = payload if rows_in_use is None else rows_in_use.contiguous().view(torch.uint8)
        at_once = rows_at_once or NVFP4_RECEIVE_ROWS
        _nvfp4_tokens_kernel[(triton.cdiv(rows, at_once), hidden // chunk)](
            payload, out, in_use, rows, hidden, payload.stride(0), CHUNK=chunk, ROWS=at_once,
            SOME_ROWS=rows_in_use is not None,
            USE_ASM=NVFP4_RECEIVE_PTX and dtype == torch.bfloat16 and payload.device.type == "cuda")
    return out


def route_rows(topk_ids: torch.Tensor, topk_weights: torch.Tensor, replica_slots: torch.Tensor,
               replica_count: torch.Tensor, slots_per_rank: int, me: int, counts_table: torch.Tensor,
               block_tokens: int | None = None):
    """(local_index int32 [T, EP], meta uint8 [T, EP, 8K]) of this rank's tokens, its counts put into every peer's
    matrix: what the torch layout of PeerToPeerRank.send_counts computes, in two kernels over blocks of tokens (the
    blocks' layouts, then their offsets)."""
    tokens, top_k = topk_ids.shape
    ep = counts_table.numel()
    ep_pow2 = triton.next_power_of_2(ep)
    # small blocks, many programs (a block of 1024 took ~30 us on an H100); 256 blocks at most for the offsets' tile
    block_t = block_tokens or max(32, triton.next_power_of_2(triton.cdiv(tokens, 256)))
    num_blocks = max(1, triton.cdiv(tokens, block_t))
    device = topk_ids.device
    local_index = torch.empty(tokens, ep, dtype=torch.int32, device=device)
    meta = torch.empty(tokens, ep, 2 * top_k, dtype=torch.int32, device=device)
    block_counts = torch.empty(num_blocks, ep, dtype=torch.int32, device=device)
    _route_block_kernel[(num_blocks,)](topk_ids.contiguous(), topk_weights.contiguous(), replica_slots, replica_count,
                                       local_index, meta, block_counts, tokens, me, slots_per_rank,
                                       replica_slots.stride(0), EP=ep, EP_POW2=ep_pow2, TOP_K=top_k, BLOCK_T=block_t,
                                       K_POW2=triton.next_power_of_2(top_k))
    _route_offsets_kernel[(num_blocks,)](local_index, block_counts, counts_table, tokens, num_blocks, me, EP=ep,
                                         EP_POW2=ep_pow2, BLOCK_T=block_t,
                                         BLOCKS_POW2=triton.next_power_of_2(num_blocks))
    return local_index, meta.view(torch.uint8)


def put_counts(counts_table: torch.Tensor, my_counts: torch.Tensor, me: int) -> None:
    """my_counts: int32 [EP]; counts_table: int64 [EP], addresses of int32 [EP, EP] matrices."""
    ep = counts_table.numel()
    _put_counts_kernel[(ep,)](counts_table, my_counts, me, EP=ep, EP_POW2=triton.next_power_of_2(ep))


@dataclass
class Placement:
    """Where rank `me`'s rows start in each rank's receive area: in its fixed region of `region_rows` rows (low
    latency), or (region_rows None) after the rows the ranks before it send there, read from `counts`, this rank's
    [EP, EP] count matrix once every rank has put its row."""

    counts: torch.Tensor
    me: int
    region_rows: int | None = None

    def kernel_args(self) -> dict:
        ep = self.counts.shape[0]
        return dict(counts_ptr=self.counts, me=self.me, region_rows=self.region_rows or 0, EP=ep,
                    EP_POW2=triton.next_power_of_2(ep), LOW_LATENCY=self.region_rows is not None)


MAX_CHUNK = 1024


def chunk_of(hidden: int) -> int:
    """Values a fused-quantizing put (or the NVFP4 receive) handles at once: the largest power of two up to 1024
    dividing the hidden size (a multiple of 128). (An NVFP4_PUT step above 1024 takes the whole row instead.)"""
    return min(MAX_CHUNK, hidden & -hidden)


NVFP4_PUT = (1, 8192, 4)  # the NVFP4 put's (tokens a program quantizes at once, values a step, warps). A step above
# 1024 takes a row of up to that many values whole (one load for the amax and the codes); longer rows go in steps of
# 1024. On an H100, 8 ranks x 4096 tokens, whole rows against steps of 1024: LL dispatch 2489 -> 2427 us; with the
# row addresses loaded first too, 2563 -> 2132 (scripts/probes/ep_nvfp4_variants.py; docs/perf.md)
BUDGET_ROWS, BUDGET_WARPS = 8, 8  # a put on an SM budget: rows a program moves at once, warps it has


def programs_along_rows(rows: int, chunks: int, max_programs: int | None) -> tuple[int, int, int]:
    """(programs along the rows, rows each moves at once, warps) of a put whose rows split into `chunks` programs each:
    a program a row; or, on an SM budget (max_programs: a program runs on one SM at a time), as many as keep the grid
    within it, each looping over rows BUDGET_ROWS at a time with BUDGET_WARPS warps (one row at a time leaves an SM
    waiting on each load). At least one a chunk: a budget below `chunks` (7 for a combine of 7168 values) still takes
    `chunks` programs."""
    if max_programs is None:
        return rows, 1, 4
    return max(1, min(triton.cdiv(rows, BUDGET_ROWS), max_programs // chunks)), BUDGET_ROWS, BUDGET_WARPS


def _check_row_bytes(row_bytes: int) -> None:
    if row_bytes % 16:  # the puts store 16 bytes at a time from each row's start
        raise ValueError(f"receive rows must be a multiple of 16 bytes long, got {row_bytes}")


def put_rows(payload: torch.Tensor, meta: torch.Tensor, local_index: torch.Tensor, recv_table: torch.Tensor,
             row_bytes: int, placement: Placement, max_programs: int | None = None) -> None:
    """payload: uint8 [T, P]; meta: uint8 [T, EP, M]; local_index: int32 [T, EP] (-1: not sent); receive rows of
    row_bytes >= P + M; P and M multiples of 4, row_bytes of 16. max_programs: the grid's cap (programs_along_rows)."""
    tokens, ep = local_index.shape
    payload_words, meta_words = payload.shape[1] // 4, meta.shape[2] // 4
    _check_row_bytes(row_bytes)
    if meta_words > WORDS_PER_PROGRAM:
        raise ValueError(f"routing metadata of {meta.shape[2]} bytes a row exceeds {4 * WORDS_PER_PROGRAM}")
    if tokens:
        chunks = triton.cdiv(payload_words, WORDS_PER_PROGRAM)
        programs, rows_at_once, warps = programs_along_rows(tokens, chunks, max_programs)
        _put_rows_kernel[(programs, chunks)](payload.view(torch.int32), meta.view(torch.int32), local_index,
                                            recv_table_ptr=recv_table, num_tokens=tokens, payload_words=payload_words,
                                            meta_words=meta_words, row_words=row_bytes // 4, BLOCK=WORDS_PER_PROGRAM,
                                            META_BLOCK=triton.next_power_of_2(max(meta_words, 1)), ROWS=rows_at_once,
                                            num_warps=warps, **placement.kernel_args())


def put_quantized_rows(fmt: str, x: torch.Tensor, meta: torch.Tensor, local_index: torch.Tensor,
                       recv_table: torch.Tensor, row_bytes: int, placement: Placement,
                       max_programs: int | None = None) -> None:
    """put_rows with the payload of token format `fmt` (fp8 or nvfp4) made here from x [T, H] (H a multiple of 128):
    each token read and quantized once, whatever the number of ranks it goes to (NVFP4 reads it twice: its amax,
    then its blocks)."""
    tokens = local_index.shape[0]
    hidden = x.shape[1]
    meta_words = meta.shape[2] // 4
    _check_row_bytes(row_bytes)
    if hidden % FP8_GROUP:
        raise ValueError(f"the fused {fmt} put needs a hidden size divisible by {FP8_GROUP}, got {hidden}")
    if tokens:
        kernel = {"fp8": _put_rows_fp8_kernel, "nvfp4": _put_rows_nvfp4_kernel}[fmt]
        if fmt == "fp8":
            # (whole rows in one step, 8 warps, lost on an H100: 171 against 123 us a rank at 8 ranks x 4096 tokens)
            programs, rows_at_once, warps = programs_along_rows(tokens, 1, max_programs)
            extra = dict(GROUP=FP8_GROUP, ROWS=rows_at_once, CHUNK=chunk_of(hidden), num_warps=warps)
        else:  # NVFP4: ROWS tokens at a time (their amax first), whatever the budget
            rows_at_once, chunk, warps = NVFP4_PUT
            programs = min(triton.cdiv(tokens, rows_at_once), max_programs or tokens)
            whole_row = MAX_CHUNK < chunk and hidden <= chunk
            chunk = triton.next_power_of_2(hidden) if whole_row else min(chunk, chunk_of(hidden))
            extra = dict(ROWS=rows_at_once, CHUNK=chunk, num_warps=warps, WHOLE_ROW=whole_row, code_bytes=hidden // 2)
        kernel[(programs,)](x, meta.view(torch.int32), local_index, recv_table_ptr=recv_table, num_tokens=tokens,
                            hidden=hidden, meta_words=meta_words, row_bytes=row_bytes,
                            BLOCK=triton.next_power_of_2(max(meta_words, 1)), **extra, **placement.kernel_args())


def pull_results(results_table: torch.Tensor, local_index: torch.Tensor, first: torch.Tensor | None, out: torch.Tensor,
                 me: int, region_rows: int | None = None, max_programs: int | None = None) -> None:
    """out [T, H] <- each token's results, summed over the ranks it went to. results_table: int64 [EP], addresses of
    [rows, H] areas in out's dtype; local_index: int32 [T, EP] (-1: not sent there); first: int32 [EP], where this
    rank's rows start in each rank's area (high throughput), or None with region_rows (low latency: this rank's fixed
    region). max_programs: the grid's cap (programs_along_rows)."""
    tokens, ep = local_index.shape
    hidden = out.shape[1]
    if (first is None) == (region_rows is None):
        raise ValueError("pull_results takes either first (high throughput) or region_rows (low latency)")
    if tokens:
        block = min(1024, triton.next_power_of_2(hidden))
        chunks = triton.cdiv(hidden, block)
        programs, rows_at_once, warps = programs_along_rows(tokens, chunks, max_programs)
        _pull_results_kernel[(programs, chunks)](results_table, local_index,
                                                 first if first is not None else local_index,
                                                 out, tokens, hidden, me, region_rows or 0, EP=ep,
                                                 LOW_LATENCY=first is None, BLOCK=block, ROWS=rows_at_once,
                                                 num_warps=warps)
