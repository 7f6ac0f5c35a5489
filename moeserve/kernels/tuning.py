"""Block sizes of the grouped GEMM per card, weight format and number of (token, expert) rows: a small
table kept in the repo (moeserve/kernels/configs/<card>.json), written by `moeserve bench moe
--tune-output FILE`, which times every candidate below on the shapes it is given and keeps the fastest
(the method and the date are stored in the file). Shapes without an entry use default_config."""

import functools
import itertools
import json
from pathlib import Path

import torch

from moeserve.kernels.moe_gemm import GemmConfig

CONFIG_DIR = Path(__file__).parent / "configs"
METHOD = ("fused_experts timed with CUDA events (median of 20 after 5 warm-ups) for each candidate "
          "block_m x block_n x block_k x num_warps x num_stages; the fastest kept per (format, rows)")


def default_config(num_rows: int) -> GemmConfig:
    """Small M blocks when each expert sees few rows (decode), large ones for prefill."""
    if num_rows <= 1024:
        return GemmConfig(block_m=16, block_n=64, block_k=128)
    return GemmConfig(block_m=64, block_n=128, block_k=64)


def candidates(fmt: str):
    for block_m, block_n, block_k, warps, stages in itertools.product((16, 64, 128), (64, 128), (64, 128), (4, 8), (3,)):
        yield GemmConfig(block_m, block_n, block_k, warps, stages)


def card_file(device_name: str) -> Path:
    return CONFIG_DIR / (device_name.replace(" ", "_") + ".json")


@functools.cache
def load_table(device_name: str) -> dict:
    path = card_file(device_name)
    return json.loads(path.read_text()) if path.is_file() else {}


def tuned_config(fmt: str, hidden: int, intermediate: int, num_rows: int) -> GemmConfig:
    if not torch.cuda.is_available():
        return default_config(num_rows)
    entries = load_table(torch.cuda.get_device_name()).get("configs", {}).get(f"{fmt}/{hidden}x{intermediate}", {})
    sizes = sorted(int(rows) for rows in entries)
    fitting = [rows for rows in sizes if rows <= num_rows] or sizes[:1]
    return GemmConfig(**entries[str(fitting[-1])]) if fitting else default_config(num_rows)
