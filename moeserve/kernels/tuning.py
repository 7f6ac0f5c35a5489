"""Block sizes of the grouped GEMM per card, weight format and number of (token, expert) rows: a small
table kept in the repo (moeserve/kernels/configs/<card>.json), written by `moeserve bench moe
--tune-output FILE` (an existing table keeps the shapes it does not sweep), which times every candidate below on the shapes it is given and keeps the fastest
(the method and the date are stored in the file). Shapes without an entry use default_config."""

import functools
import itertools
import json
from pathlib import Path

import torch

from moeserve.kernels.moe_gemm import GemmConfig

CONFIG_DIR = Path(__file__).parent / "configs"
DECODE_MAX_ROWS = 1024  # (token, expert) rows up to which the decode configs (16-row tiles, split-K) apply
WIDE_DECODE_ROWS_PER_EXPERT = 16  # above this many rows per expert on average, decode blocks are 64 rows
LARGE_TILE_SHARED_MEMORY = 160 * 1024  # bytes a block may use for the prefill defaults' large tiles (Hopper: 227 KiB)
METHOD = ("fused_experts timed with CUDA events as CUDA-graph replays (median of 20 after 5 warm-ups; a "
          "candidate that cannot be captured is skipped) for each candidate of "
          "moeserve.kernels.tuning.candidates (decode: swap_ab x block_n x block_k x split_k; prefill: block_m x "
          "block_k x num_warps x group_m x persistent); the fastest kept per (format, rows)")


def default_config(num_rows: int, fmt: str = "bf16", large_tiles: bool = True, num_experts: int = 1) -> GemmConfig:
    """Decode: the product transposed (wgmma on the weights' side) with blocks of 64 rows once the experts average more
    than 16 rows each (each weight tile then read once: DeepSeek-V3 layer, 32 experts, 128 tokens, H100: bf16
    1.37 -> 0.98 ms, FP8 0.65 -> 0.55), 16-row blocks below (FP8 transposed, 128 columns); NVFP4 as is (its fastest
    there: 0.87 ms at 128 tokens against 1.01 transposed; "nvfp4" means bf16 activations, whose codes become bf16 by
    bit operations: NVFP4 weights with other activations are "nvfp4-fp16" / "nvfp4-fp32" and take the plain blocks).
    Prefill: large tiles; for
    FP8 one K step per 128-wide scale block with N tiles inside one weight scale block, for bf16 wide N tiles (the
    fastest of scripts/probes/fp8_prefill_sweep.py on an H100, 2026-12-07: 562 and 491 TFLOP/s at DeepSeek-V3's
    8,192 tokens). Measured by scripts/probes/swap_ab_sweep.py (docs/perf.md)."""
    if num_rows <= DECODE_MAX_ROWS:
        many_rows = num_rows > WIDE_DECODE_ROWS_PER_EXPERT * num_experts
        if fmt == "nvfp4":  # not transposed; long K steps amortize the conversion's fixed part at 1-32 tokens (3-6%)
            return GemmConfig(block_m=16, block_n=128, block_k=128 if many_rows else 256)
        if many_rows and large_tiles and fmt in ("bf16", "fp8"):
            return GemmConfig(block_m=64, block_n=128, block_k=128, swap_ab=True)
        if fmt == "fp8":
            return GemmConfig(block_m=16, block_n=128, block_k=128, swap_ab=True)
        return GemmConfig(block_m=16, block_n=64, block_k=128)
    if not large_tiles:  # cards with ~100 KiB of shared memory a block (sm_86, sm_89)
        return GemmConfig(block_m=64, block_n=128, block_k=64)
    if fmt == "fp8":
        return GemmConfig(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3)
    if fmt == "bf16":
        return GemmConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)
    return GemmConfig(block_m=64, block_n=128, block_k=64)  # fp32 (its 4-byte tiles need less shared memory) and NVFP4


def candidates(num_rows: int):
    """Decode (few rows per expert): small M blocks, K split to fill the SMs, the product as is or transposed. Prefill: large tiles,
    grouped tile order, optionally a persistent grid; K steps of 128 as well (one per FP8 scale block)."""
    if num_rows <= DECODE_MAX_ROWS:
        for swap_ab, block_n, block_k, split_k in itertools.product((False, True), (32, 64, 128), (64, 128), (1, 2, 4)):
            yield GemmConfig(16, block_n, block_k, num_warps=4, num_stages=3, split_k=split_k, swap_ab=swap_ab)
        for block_m in (32, 64):  # many rows per expert (few experts, 32+ tokens)
            yield GemmConfig(block_m, 128, 128, num_warps=4, num_stages=3, swap_ab=True)
        return
    sizes = itertools.product((64, 128), (64, 128), (4, 8), (1, 8), (False, True))
    for block_m, block_k, warps, group_m, persistent in sizes:
        yield GemmConfig(block_m, 128, block_k, num_warps=warps, num_stages=3, group_m=group_m, persistent=persistent)
    yield GemmConfig(128, 256, 64, num_warps=8, num_stages=3)  # wide N tiles (bf16's fastest on an H100)


def card_file(device_name: str) -> Path:
    return CONFIG_DIR / (device_name.replace(" ", "_") + ".json")


@functools.cache
def load_table(device_name: str) -> dict:
    path = card_file(device_name)
    return json.loads(path.read_text()) if path.is_file() else {}


@functools.cache  # asked by every MoE layer at every step
def tuned_config(fmt: str, hidden: int, intermediate: int, num_rows: int, num_experts: int = 1) -> GemmConfig:
    table, large_tiles = {}, True
    if torch.cuda.is_available():
        table = load_table(torch.cuda.get_device_name())
        large_tiles = torch.cuda.get_device_properties().shared_memory_per_block_optin >= LARGE_TILE_SHARED_MEMORY
    return lookup(table, fmt, hidden, intermediate, num_rows, large_tiles, num_experts)


def lookup(table: dict, fmt: str, hidden: int, intermediate: int, num_rows: int, large_tiles: bool = True,
           num_experts: int = 1) -> GemmConfig:
    """The entry tuned for the largest row count <= num_rows (the smallest one below all of them), within the same
    regime (decode: <= DECODE_MAX_ROWS rows; prefill above); the defaults where the regime has no entry."""
    entries = table.get("configs", {}).get(f"{fmt}/{hidden}x{intermediate}", {})
    prefill = num_rows > DECODE_MAX_ROWS
    sizes = sorted(int(rows) for rows in entries if (int(rows) > DECODE_MAX_ROWS) == prefill)
    fitting = [rows for rows in sizes if rows <= num_rows] or sizes[:1]
    if fitting:
        return GemmConfig(**entries[str(fitting[-1])])
    return default_config(num_rows, fmt, large_tiles, num_experts)
