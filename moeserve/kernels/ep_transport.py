"""Expert-parallel transport kernels over peer memory: each takes a table of addresses (int64), one per EP rank, of
that rank's buffer, and writes into peers' buffers directly (one-sided puts). On one GPU the addresses are R buffers of
the same device (virtual ranks); across GPUs they are the peer pointers of symmetric memory. Rows move as 32-bit
words (every row size is a multiple of 4 bytes).
References: moeserve.distributed.ep.peer_to_peer (what each put means) and the all-to-all dispatcher (same results)."""

import torch
import triton
import triton.language as tl

from moeserve.kernels.activation import FP8_GROUP, quantize_e4m3_group, round_to_e4m3_grid

WORDS_PER_PROGRAM = 1024


@triton.jit
def _peer(table_ptr, rank, dtype: tl.constexpr):
    return tl.load(table_ptr + rank).to(tl.pointer_type(dtype))


@triton.jit
def _put_counts_kernel(counts_table_ptr, my_counts_ptr, me, EP: tl.constexpr, EP_POW2: tl.constexpr):
    """Row `me` of every peer's [EP, EP] count matrix <- this rank's rows for each destination."""
    peer = tl.program_id(0)
    offs = tl.arange(0, EP_POW2)
    counts = tl.load(my_counts_ptr + offs, mask=offs < EP)
    tl.store(_peer(counts_table_ptr, peer, tl.int32) + me * EP + offs, counts, mask=offs < EP)


@triton.jit
def _route_rows_kernel(ids_ptr, weights_ptr, replica_slots_ptr, replica_count_ptr, local_index_ptr, meta_ptr,
                       counts_table_ptr, num_tokens, me, slots_per_rank, stride_replicas,
                       EP: tl.constexpr, EP_POW2: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr):
    """The send side's whole layout in one program: each (token, k)'s replica (token + me mod its count), the ranks
    each token goes to, its index among this rank's rows to each (a running prefix sum over token chunks), the
    metadata rows [K slots (-1: not there) | K weights] per (token, rank), and this rank's counts into row `me` of
    every peer's count matrix."""
    ranks = tl.arange(0, EP_POW2)
    rank_ok = ranks < EP
    running = tl.zeros((EP_POW2,), dtype=tl.int32)
    meta_weights_ptr = meta_ptr.to(tl.pointer_type(tl.float32))
    for first in range(0, num_tokens, BLOCK_T):
        tokens = first + tl.arange(0, BLOCK_T)
        token_ok = tokens < num_tokens
        ok = token_ok[:, None] & rank_ok[None, :]
        goes = tl.zeros((BLOCK_T, EP_POW2), dtype=tl.int32)
        meta_row = (tokens.to(tl.int64)[:, None] * EP + ranks[None, :]) * (2 * TOP_K)
        for k in tl.static_range(TOP_K):
            expert = tl.load(ids_ptr + tokens * TOP_K + k, mask=token_ok, other=0).to(tl.int64)
            replicas = tl.load(replica_count_ptr + expert, mask=token_ok, other=1)
            physical = tl.load(replica_slots_ptr + expert * stride_replicas + (tokens + me) % replicas, mask=token_ok,
                               other=0)
            weight = tl.load(weights_ptr + tokens * TOP_K + k, mask=token_ok, other=0.0).to(tl.float32)
            hit = (physical // slots_per_rank)[:, None] == ranks[None, :]
            goes = tl.maximum(goes, hit.to(tl.int32))
            tl.store(meta_ptr + meta_row + k, tl.where(hit, (physical % slots_per_rank)[:, None], -1).to(tl.int32),
                     mask=ok)
            tl.store(meta_weights_ptr + meta_row + TOP_K + k, tl.where(hit, weight[:, None], 0.0), mask=ok)
        goes = tl.where(ok, goes, 0)
        index = running[None, :] + tl.cumsum(goes, axis=0) - 1
        tl.store(local_index_ptr + tokens[:, None] * EP + ranks[None, :], tl.where(goes > 0, index, -1), mask=ok)
        running += tl.sum(goes, axis=0)
    for peer in range(EP):
        tl.store(_peer(counts_table_ptr, peer, tl.int32) + me * EP + ranks, running, mask=rank_ok)


@triton.jit
def _put_rows_kernel(payload_ptr, meta_ptr, position_ptr, recv_table_ptr, payload_words, meta_words,
                     EP: tl.constexpr, BLOCK: tl.constexpr):
    """Token t to destination d (program (t, d)), if it goes there: its payload words, then its metadata for d,
    as row position[t, d] of d's receive area (rows of payload_words + meta_words words)."""
    token = tl.program_id(0).to(tl.int64)
    dest = tl.program_id(1)
    position = tl.load(position_ptr + token * EP + dest).to(tl.int64)
    if position >= 0:
        row_words = payload_words + meta_words
        row = _peer(recv_table_ptr, dest, tl.int32) + position * row_words
        for start in range(0, payload_words, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < payload_words
            tl.store(row + offs, tl.load(payload_ptr + token * payload_words + offs, mask=ok), mask=ok)
        offs = tl.arange(0, BLOCK)
        ok = offs < meta_words
        meta = tl.load(meta_ptr + (token * EP + dest) * meta_words + offs, mask=ok)
        tl.store(row + payload_words + offs, meta, mask=ok)


@triton.jit
def _put_meta(meta_ptr, position_ptr, recv_table_ptr, token, row_bytes, payload_bytes, meta_words,
              EP: tl.constexpr, BLOCK: tl.constexpr):
    """Token t's metadata for each rank d it goes to, after the payload of its row there."""
    offs = tl.arange(0, BLOCK)
    ok = offs < meta_words
    for dest in range(EP):
        position = tl.load(position_ptr + token * EP + dest).to(tl.int64)
        if position >= 0:
            row = _peer(recv_table_ptr, dest, tl.uint8) + position * row_bytes
            meta = tl.load(meta_ptr + (token * EP + dest) * meta_words + offs, mask=ok)
            tl.store((row + payload_bytes).to(tl.pointer_type(tl.int32)) + offs, meta, mask=ok)


@triton.jit
def _put_rows_fp8_kernel(x_ptr, meta_ptr, position_ptr, recv_table_ptr, hidden, meta_words,
                         EP: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """Token t (program t), quantized once to FP8 1x128 (as quantize_fp8_groups), to every rank it goes to: row
    position[t, d] of d's receive area gets [H codes | H/128 fp32 scales | its metadata for d]."""
    token = tl.program_id(0).to(tl.int64)
    payload_bytes = hidden + hidden // GROUP * 4
    row_bytes = payload_bytes + meta_words * 4
    for group in range(0, hidden // GROUP):
        offs = group * GROUP + tl.arange(0, GROUP)
        values, scale = quantize_e4m3_group(tl.load(x_ptr + token * hidden + offs).to(tl.float32), 0)
        for dest in range(EP):
            position = tl.load(position_ptr + token * EP + dest).to(tl.int64)
            if position >= 0:
                row = _peer(recv_table_ptr, dest, tl.uint8) + position * row_bytes
                tl.store(row.to(tl.pointer_type(tl.float8e4nv)) + offs, values)
                tl.store((row + hidden).to(tl.pointer_type(tl.float32)) + group, scale)
    _put_meta(meta_ptr, position_ptr, recv_table_ptr, token, row_bytes, payload_bytes, meta_words, EP, BLOCK)


@triton.jit
def _e2m1_codes(scaled):
    """Scaled values -> E2M1 codes (sign bit 8), to the nearest magnitude, ties to the even code, saturating at 6, NaN to
    0: moeserve.quant.nvfp4.e2m1_codes."""
    magnitude = tl.abs(scaled)
    index = ((magnitude > 0.25).to(tl.int32) + (magnitude >= 0.75).to(tl.int32) + (magnitude > 1.25).to(tl.int32)
             + (magnitude >= 1.75).to(tl.int32) + (magnitude > 2.5).to(tl.int32) + (magnitude >= 3.5).to(tl.int32)
             + (magnitude > 5.0).to(tl.int32))
    return index | ((scaled < 0).to(tl.int32) * 8)


@triton.jit
def _without_nan_rule(value, bound, take_min: tl.constexpr):
    """min / max with a bound that keeps a NaN (the GPU's min and max would drop it; torch's clamp keeps it)."""
    bounded = tl.minimum(value, bound) if take_min else tl.maximum(value, bound)
    return tl.where(value != value, value, bounded)


@triton.jit
def _put_rows_nvfp4_kernel(x_ptr, meta_ptr, position_ptr, recv_table_ptr, hidden, meta_words,
                           EP: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Token t (program t), quantized once to NVFP4 (as the nvfp4 token format packs it: a global scale amax / 2688 per
    token, an E4M3 scale per 16 values, E2M1 codes two a byte), to every rank it goes to: row position[t, d] of d's
    receive area gets [H/2 code bytes | H/16 E4M3 scales | fp32 global scale | its metadata for d]."""
    token = tl.program_id(0).to(tl.int64)
    payload_bytes = hidden // 2 + hidden // 16 + 4
    row_bytes = payload_bytes + meta_words * 4
    amax = 0.0
    has_nan = 0
    for start in range(0, hidden, CHUNK):  # first pass: the token's amax
        v = tl.load(x_ptr + token * hidden + start + tl.arange(0, CHUNK)).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=0))
        has_nan = tl.maximum(has_nan, tl.max((v != v).to(tl.int32), axis=0))
    glob = tl.where(amax == 0, 1.0, tl.math.div_rn(amax, 2688.0))  # 6 * 448
    glob = tl.where(has_nan > 0, float("nan"), glob)
    six_glob = glob * 6.0
    for start in range(0, hidden, CHUNK):
        v = tl.reshape(tl.load(x_ptr + token * hidden + start + tl.arange(0, CHUNK)).to(tl.float32), (CHUNK // 16, 16))
        block_amax = tl.max(tl.abs(v), axis=1)
        block_amax = tl.where(tl.max((v != v).to(tl.int32), axis=1) > 0, float("nan"), block_amax)
        raw = _without_nan_rule(tl.math.div_rn(block_amax, six_glob), 0.001953125, False)  # at least 2^-9
        scale = tl.where(block_amax == 0, 1.0, raw)
        scale = round_to_e4m3_grid(_without_nan_rule(scale, 448.0, True))
        scaled = tl.math.div_rn(v, (scale * glob)[:, None])
        low, high = tl.split(tl.reshape(_e2m1_codes(scaled), (CHUNK // 16, 8, 2)))
        packed = tl.reshape((low | (high << 4)).to(tl.uint8), (CHUNK // 2,))
        for dest in range(EP):
            position = tl.load(position_ptr + token * EP + dest).to(tl.int64)
            if position >= 0:
                row = _peer(recv_table_ptr, dest, tl.uint8) + position * row_bytes
                tl.store(row + start // 2 + tl.arange(0, CHUNK // 2), packed)
                tl.store((row + hidden // 2 + start // 16).to(tl.pointer_type(tl.float8e4nv))
                         + tl.arange(0, CHUNK // 16), scale.to(tl.float8e4nv))
    for dest in range(EP):
        position = tl.load(position_ptr + token * EP + dest).to(tl.int64)
        if position >= 0:
            row = _peer(recv_table_ptr, dest, tl.uint8) + position * row_bytes
            tl.store((row + hidden // 2 + hidden // 16).to(tl.pointer_type(tl.float32)), glob)
    _put_meta(meta_ptr, position_ptr, recv_table_ptr, token, row_bytes, payload_bytes, meta_words, EP, BLOCK)


@triton.jit
def _put_results_kernel(y_ptr, source_ptr, index_ptr, back_table_ptr, me, max_tokens, hidden,
                        BLOCK: tl.constexpr):
    """Received row i's result y[i] -> slot (me, index[i]) of its source rank's [EP, max_tokens, H] area; nothing
    for index -1 (a row slot that held no token)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < hidden
    source = tl.load(source_ptr + row)
    index = tl.load(index_ptr + row).to(tl.int64)
    if index >= 0:
        back = _peer(back_table_ptr, source, y_ptr.dtype.element_ty)
        tl.store(back + (me * max_tokens + index) * hidden + offs, tl.load(y_ptr + row * hidden + offs, mask=ok),
                 mask=ok)


@triton.jit
def _sum_results_kernel(back_ptr, local_index_ptr, out_ptr, max_tokens, hidden, EP: tl.constexpr,
                        BLOCK: tl.constexpr):
    """out[t] = sum over the ranks d that token t went to of back[d, local_index[t, d]], in fp32."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < hidden
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for dest in tl.static_range(EP):
        index = tl.load(local_index_ptr + token * EP + dest).to(tl.int64)
        part = tl.load(back_ptr + (dest * max_tokens + index) * hidden + offs, mask=ok & (index >= 0), other=0.0)
        acc += part.to(tl.float32)
    tl.store(out_ptr + token * hidden + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def route_rows(topk_ids: torch.Tensor, topk_weights: torch.Tensor, replica_slots: torch.Tensor,
               replica_count: torch.Tensor, slots_per_rank: int, me: int, counts_table: torch.Tensor):
    """(local_index int32 [T, EP], meta uint8 [T, EP, 8K]) of this rank's tokens, its counts put into every peer's
    matrix: one kernel for what the torch layout of PeerToPeerRank.send_counts computes."""
    tokens, top_k = topk_ids.shape
    ep = counts_table.numel()
    local_index = torch.empty(tokens, ep, dtype=torch.int32, device=topk_ids.device)
    meta = torch.empty(tokens, ep, 2 * top_k, dtype=torch.int32, device=topk_ids.device)
    _route_rows_kernel[(1,)](topk_ids.contiguous(), topk_weights.contiguous(), replica_slots, replica_count,
                             local_index, meta, counts_table, tokens, me, slots_per_rank, replica_slots.stride(0),
                             EP=ep, EP_POW2=triton.next_power_of_2(ep), TOP_K=top_k, BLOCK_T=128)
    return local_index, meta.view(torch.uint8)


def put_counts(counts_table: torch.Tensor, my_counts: torch.Tensor, me: int) -> None:
    """my_counts: int32 [EP]; counts_table: int64 [EP], addresses of int32 [EP, EP] matrices."""
    ep = counts_table.numel()
    _put_counts_kernel[(ep,)](counts_table, my_counts, me, EP=ep, EP_POW2=triton.next_power_of_2(ep))


def put_rows(payload: torch.Tensor, meta: torch.Tensor, position: torch.Tensor, recv_table: torch.Tensor) -> None:
    """payload: uint8 [T, P]; meta: uint8 [T, EP, M]; position: int32 [T, EP] (-1: not sent); P and M multiples of 4."""
    tokens, ep = position.shape
    payload_words, meta_words = payload.shape[1] // 4, meta.shape[2] // 4
    if meta_words > WORDS_PER_PROGRAM:
        raise ValueError(f"routing metadata of {meta.shape[2]} bytes a row exceeds {4 * WORDS_PER_PROGRAM}")
    if tokens:
        _put_rows_kernel[(tokens, ep)](payload.view(torch.int32), meta.view(torch.int32), position, recv_table,
                                       payload_words, meta_words, EP=ep, BLOCK=WORDS_PER_PROGRAM)


def put_quantized_rows(fmt: str, x: torch.Tensor, meta: torch.Tensor, position: torch.Tensor,
                       recv_table: torch.Tensor) -> None:
    """put_rows with the payload of token format `fmt` (fp8 or nvfp4) made here from x [T, H] (H a multiple of 128):
    each token read and quantized once, whatever the number of ranks it goes to (NVFP4 reads it twice: its amax,
    then its blocks)."""
    tokens, ep = position.shape
    hidden = x.shape[1]
    meta_words = meta.shape[2] // 4
    if hidden % FP8_GROUP:
        raise ValueError(f"the fused {fmt} put needs a hidden size divisible by {FP8_GROUP}, got {hidden}")
    if tokens:
        kernel, step = {"fp8": (_put_rows_fp8_kernel, "GROUP"), "nvfp4": (_put_rows_nvfp4_kernel, "CHUNK")}[fmt]
        kernel[(tokens,)](x, meta.view(torch.int32), position, recv_table, hidden, meta_words, EP=ep,
                          BLOCK=triton.next_power_of_2(max(meta_words, 1)), **{step: FP8_GROUP})


def put_results(y: torch.Tensor, source: torch.Tensor, index: torch.Tensor, back_table: torch.Tensor, me: int,
                max_tokens: int) -> None:
    """y: [R, H] in the back areas' dtype; source, index: int32 [R]."""
    rows, hidden = y.shape
    if rows:
        block = min(1024, triton.next_power_of_2(hidden))
        _put_results_kernel[(rows, triton.cdiv(hidden, block))](y, source, index, back_table, me, max_tokens, hidden,
                                                                BLOCK=block)


def sum_results(back: torch.Tensor, local_index: torch.Tensor, out: torch.Tensor) -> None:
    """back: [EP, max_tokens, H]; local_index: int32 [T, EP] (-1: not sent there); out: [T, H]."""
    tokens, ep = local_index.shape
    hidden = out.shape[1]
    if tokens:
        block = min(1024, triton.next_power_of_2(hidden))
        _sum_results_kernel[(tokens, triton.cdiv(hidden, block))](back, local_index, out, back.shape[1], hidden,
                                                                  EP=ep, BLOCK=block)
