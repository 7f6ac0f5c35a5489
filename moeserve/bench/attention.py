"""The paged attention kernels on one GPU, timed as CUDA-graph replays (median of CUDA events), beside
yardsticks measured in the same run: the card's read bandwidth (a sum over a 4 GiB tensor) and torch's
scaled_dot_product_attention (flash) on the same dense prefill shapes.

Decode reads every cached byte of the batch once: KV TB/s = cache bytes of the contexts / time. Blocks
are scattered at random over a pool that holds exactly the batch. FLOPs count the score and output
products (MLA: 576-wide scores, 512-wide outputs; causal prefill: half the square).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeserve.bench.timing import graph_of, time_ms
from moeserve.kernels.attention.flash_prefill import flash_attention_varlen
from moeserve.kernels.attention.gqa_paged import paged_decode, paged_decode_num_splits, paged_prefill
from moeserve.kernels.attention.mla_decode import mla_decode, mla_decode_num_splits


@dataclass(frozen=True)
class AttentionShape:
    name: str
    kind: str  # "mla" or "gqa"
    num_heads: int
    num_kv_heads: int = 1
    head_dim: int = 128  # GQA
    kv_lora_rank: int = 512  # MLA
    rope_dim: int = 64
    nope_dim: int = 128
    v_head_dim: int = 128


SHAPES = {
    "v2-lite": AttentionShape("DeepSeek-V2-Lite MLA", "mla", 16),
    "v3": AttentionShape("DeepSeek-V3 MLA", "mla", 128),
    "v3-tp8": AttentionShape("DeepSeek-V3 MLA, TP 8", "mla", 16),
    "qwen3": AttentionShape("Qwen3-30B-A3B GQA", "gqa", 32, 4),
    "mixtral": AttentionShape("Mixtral GQA", "gqa", 32, 8),
}
MAX_PREFILL_TOKENS = 65536  # a prefill point's batch x context, so the dense baseline fits


@dataclass
class AttentionPoint:
    shape: str
    op: str
    batch: int
    context: int
    cache: str
    microseconds: float
    kv_tb_per_s: float
    tflops: float
    baseline: str = ""


def read_bandwidth_tb_per_s(device) -> float:
    """What the card reads per second: a sum over a 4 GiB bf16 tensor (the result is 1 element)."""
    x = torch.randn(2**31, dtype=torch.bfloat16, device=device)
    ms = time_ms(lambda: x.sum(), iterations=10)
    del x
    return 2**32 / ms / 1e9


def paged_pool(batch: int, context: int, block_size: int, row_shape: tuple, dtype, device):
    """A cache pool with the batch's contexts in blocks scattered at random, and its block table."""
    blocks_per_seq = -(-context // block_size)
    pool = torch.randn(batch * blocks_per_seq, block_size, *row_shape, device=device).to(dtype)
    table = torch.randperm(batch * blocks_per_seq, device=device).int().view(batch, blocks_per_seq)
    return pool, table


def timed(fn) -> float:
    replay = graph_of(fn)
    return 1000 * time_ms(replay or fn)


def mla_decode_point(shape: AttentionShape, batch: int, context: int, fp8: bool, block_size: int, device):
    width = shape.kv_lora_rank + shape.rope_dim
    cache_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    cache, table = paged_pool(batch, context, block_size, (width,), cache_dtype, device)
    q = torch.randn(batch, shape.num_heads, width, device=device, dtype=torch.bfloat16)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    scale = torch.ones(1, device=device)
    splits = mla_decode_num_splits(batch, shape.num_heads, context, device)
    us = timed(lambda: mla_decode(q, cache, table, seq_lens, 0.1, splits, shape.kv_lora_rank, scale if fp8 else None))
    kv_bytes = batch * context * width * cache.element_size()
    flops = 2 * batch * shape.num_heads * context * (width + shape.kv_lora_rank)
    return AttentionPoint(shape.name, "decode", batch, context, "fp8" if fp8 else "bf16", us, kv_bytes / us / 1e6,
                          flops / us / 1e6, f"{splits} splits")


def gqa_decode_point(shape: AttentionShape, batch: int, context: int, fp8: bool, block_size: int, device):
    cache_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    k_cache, table = paged_pool(batch, context, block_size, (shape.num_kv_heads, shape.head_dim), cache_dtype, device)
    v_cache = torch.randn_like(k_cache, dtype=torch.bfloat16).to(cache_dtype)
    q = torch.randn(batch, shape.num_heads, shape.head_dim, device=device, dtype=torch.bfloat16)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    scale = torch.ones(1, device=device)
    splits = paged_decode_num_splits(batch, shape.num_kv_heads, context, device)
    us = timed(lambda: paged_decode(q, k_cache, v_cache, table, seq_lens, 0.1, splits,
                                    kv_scale=scale if fp8 else None))
    kv_bytes = 2 * batch * context * shape.num_kv_heads * shape.head_dim * k_cache.element_size()
    flops = 4 * batch * shape.num_heads * context * shape.head_dim
    return AttentionPoint(shape.name, "decode", batch, context, "fp8" if fp8 else "bf16", us, kv_bytes / us / 1e6,
                          flops / us / 1e6, f"{splits} splits")


def sdpa_flash_us(q, k, v) -> float:
    """torch's flash SDPA on [B, H, S, D] (causal); v padded to q's head dim if flash needs equal dims."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if v.shape[-1] != q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))


def mla_prefill_point(shape: AttentionShape, batch: int, context: int, device):
    """MLA's prefill of new tokens (plain form, q/k 192 wide, v 128), causal, each sequence `context` long."""
    tokens, heads, qk = batch * context, shape.num_heads, shape.nope_dim + shape.rope_dim
    q, k = (torch.randn(tokens, heads, qk, device=device, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(tokens, heads, shape.v_head_dim, device=device, dtype=torch.bfloat16)
    cu = torch.arange(0, tokens + 1, context, dtype=torch.int32, device=device)
    us = timed(lambda: flash_attention_varlen(q, k, v, cu, cu, context, qk**-0.5, True))
    dense = [t.view(batch, context, heads, -1).transpose(1, 2) for t in (q, k, v)]
    flops = 2 * batch * heads * context * context * (qk + shape.v_head_dim) / 2
    baseline = sdpa_flash_us(*dense)
    return AttentionPoint(shape.name, "prefill", batch, context, "bf16", us, 0.0, flops / us / 1e6,
                          f"SDPA flash {baseline:.1f} us ({flops / baseline / 1e6:.0f} TFLOP/s, v padded to {qk})")


def gqa_prefill_point(shape: AttentionShape, batch: int, context: int, block_size: int, device):
    """GQA prefill of whole prompts over the paged cache they were just written to."""
    k_cache, table = paged_pool(batch, context, block_size, (shape.num_kv_heads, shape.head_dim), torch.bfloat16, device)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch * context, shape.num_heads, shape.head_dim, device=device, dtype=torch.bfloat16)
    starts = torch.arange(0, batch * context + 1, context, dtype=torch.int32, device=device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    us = timed(lambda: paged_prefill(q, k_cache, v_cache, table, starts, seq_lens, context, shape.head_dim**-0.5))
    group = shape.num_heads // shape.num_kv_heads
    dense_q = q.view(batch, context, shape.num_heads, -1).transpose(1, 2)
    dense_kv = [torch.randn(batch, shape.num_heads, context, shape.head_dim, device=device, dtype=torch.bfloat16)
                for _ in range(2)]  # the baseline's K/V repeated per query head (flash SDPA has no GQA in every torch)
    flops = 4 * batch * shape.num_heads * context * context * shape.head_dim / 2
    baseline = sdpa_flash_us(dense_q, *dense_kv)
    return AttentionPoint(shape.name, "prefill", batch, context, "bf16", us, 0.0, flops / us / 1e6,
                          f"SDPA flash {baseline:.1f} us ({flops / baseline / 1e6:.0f} TFLOP/s, K/V x{group})")


def measure(shape_keys: list[str], batches: list[int], contexts: list[int], block_size: int, device):
    for key in shape_keys:
        shape = SHAPES[key]
        for batch in batches:
            for context in contexts:
                for fp8 in (False, True):
                    point = mla_decode_point if shape.kind == "mla" else gqa_decode_point
                    yield point(shape, batch, context, fp8, block_size, device)
                    torch.cuda.empty_cache()
                if batch * context <= MAX_PREFILL_TOKENS:
                    yield (mla_prefill_point(shape, batch, context, device) if shape.kind == "mla" else
                           gqa_prefill_point(shape, batch, context, block_size, device))
                    torch.cuda.empty_cache()


HEADER = ("| shape | op | batch | context | cache | us | KV TB/s | TFLOP/s | notes |\n"
          "|---|---|---|---|---|---|---|---|---|")


def row(p: AttentionPoint) -> str:
    tb = f"{p.kv_tb_per_s:.2f}" if p.kv_tb_per_s else "-"
    return (f"| {p.shape} | {p.op} | {p.batch} | {p.context} | {p.cache} | {p.microseconds:.1f} | {tb} | "
            f"{p.tflops:.0f} | {p.baseline} |")
