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
LARGE_TILE_SHARED_MEMORY = 160 * 1024  # bytes a block may use for the prefill defaults' large tiles (Hopper: 227 KiB)
METHOD = ("fused_experts timed with CUDA events as CUDA-graph replays (median of 20 after 5 warm-ups; a "
          "candidate that cannot be captured is skipped) for each candidate of "
          "moeserve.kernels.tuning.candidates (decode: block_n x block_k x split_k; prefill: block_m x "
          "block_k x num_warps x group_m x persistent); the fastest kept per (format, rows)")


def default_config(num_rows: int, fmt: str = "bf16", large_tiles: bool = True) -> GemmConfig:
    """Small M blocks when each expert sees few rows (decode), large ones for prefill: for FP8 one K step per
    128-wide scale block with N tiles inside one weight scale block, for bf16 wide N tiles (the fastest of
    scripts/probes/fp8_prefill_sweep.py on an H100, 2026-12-07: 562 and 491 TFLOP/s at DeepSeek-V3's 8,192 tokens)."""
    if num_rows <= DECODE_MAX_ROWS:
        return GemmConfig(block_m=16, block_n=64, block_k=128)
    if not large_tiles:  # cards with ~100 KiB of shared memory a block (sm_86, sm_89)
        return GemmConfig(block_m=64, block_n=128, block_k=64)
    if fmt == "fp8":
        return GemmConfig(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3)
    if fmt == "bf16":
        return GemmConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)
    return GemmConfig(block_m=64, block_n=128, block_k=64)  # fp32 (its 4-byte tiles need less shared memory) and NVFP4


def candidates(num_rows: int):
    """Decode (few rows per expert): small M blocks, K split to fill the SMs. Prefill: large tiles,
    grouped tile order, optionally a persistent grid; K steps of 128 as well (one per FP8 scale block)."""
    if num_rows <= DECODE_MAX_ROWS:
        for block_n, block_k, split_k in itertools.product((32, 64, 128), (64, 128), (1, 2, 4)):
            yield GemmConfig(16, block_n, block_k, num_warps=4, num_stages=3, split_k=split_k)
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
def tuned_config(fmt: str, hidden: int, intermediate: int, num_rows: int) -> GemmConfig:
    table, large_tiles = {}, True
    if torch.cuda.is_available():
        table = load_table(torch.cuda.get_device_name())
        large_tiles = torch.cuda.get_device_properties().shared_memory_per_block_optin >= LARGE_TILE_SHARED_MEMORY
    return lookup(table, fmt, hidden, intermediate, num_rows, large_tiles)


def lookup(table: dict, fmt: str, hidden: int, intermediate: int, num_rows: int, large_tiles: bool = True) -> GemmConfig:
    """The entry tuned for the largest row count <= num_rows (the smallest one below all of them), within the same
    regime (decode: <= DECODE_MAX_ROWS rows; prefill above); the defaults where the regime has no entry."""
    entries = table.get("configs", {}).get(f"{fmt}/{hidden}x{intermediate}", {})
    prefill = num_rows > DECODE_MAX_ROWS
    sizes = sorted(int(rows) for rows in entries if (int(rows) > DECODE_MAX_ROWS) == prefill)
    fitting = [rows for rows in sizes if rows <= num_rows] or sizes[:1]
    return GemmConfig(**entries[str(fitting[-1])]) if fitting else default_config(num_rows, fmt, large_tiles)
