"""Variant timings of the decode kernels on a GPU: each tile / warp / stage choice (and, for FP8 caches,
products in fp16 or bf16) timed as CUDA-graph replays at the shapes the targets name, so the config
tables rest on measurements. Prints, per point, the fastest variants and the table's current choice.

  python scripts/attention_variants.py            (on a CUDA machine; ~4 minutes)
  python scripts/attention_variants.py --splits   MLA decode's split count, tile addressing and block size
"""

import itertools
import sys

import torch

from moeserve.bench.attention import SHAPES, gqa_decode_point, mla_decode_point
from moeserve.kernels.attention import gqa_paged, mla_decode

MLA_POINTS = [("v2-lite", 32, 4096), ("v2-lite", 128, 4096), ("v3", 128, 4096)]
GQA_POINTS = [("qwen3", 32, 4096), ("qwen3", 128, 4096)]


def mla_variants(heads: int):
    if heads <= 16:
        grid = itertools.product([16], [16, 32, 64], [4, 8], [2, 3, 4])
    else:
        grid = itertools.product([32, 64], [16, 32], [4, 8], [1, 2])
    return [mla_decode.MLADecodeConfig(*v) for v in grid]


def time_mla(key, batch, context, fp8, config, as_fp16=True):
    original = mla_decode.mla_decode_config
    mla_decode.FP8_AS_FP16 = as_fp16
    mla_decode.mla_decode_config = lambda *args: config
    try:
        return mla_decode_point(SHAPES[key], batch, context, fp8, 64, "cuda")
    finally:
        mla_decode.mla_decode_config = original
        mla_decode.FP8_AS_FP16 = True


def time_gqa(key, batch, context, fp8, config, as_fp16=True):
    original = gqa_paged.paged_decode_config
    gqa_paged.FP8_AS_FP16 = as_fp16
    gqa_paged.paged_decode_config = lambda group: config
    try:
        return gqa_decode_point(SHAPES[key], batch, context, fp8, 64, "cuda")
    finally:
        gqa_paged.paged_decode_config = original
        gqa_paged.FP8_AS_FP16 = True


def report(title, results, default):
    results = sorted((r for r in results if r[1] is not None), key=lambda r: r[1].microseconds)
    print(f"\n{title}: default {default} ->", next((f"{p.microseconds:.1f} us" for c, p in results if c == default), "?"))
    for config, point in results[:4]:
        print(f"  {point.microseconds:8.1f} us  {point.kv_tb_per_s:.2f} TB/s  {point.tflops:5.0f} TFLOP/s  {config}", flush=True)


def attempt(fn, *args):
    try:
        return fn(*args)
    except Exception as error:  # a variant that does not compile (shared memory, registers): skipped, said
        print(f"  skipped {args[-2] if len(args) > 5 else args[-1]}: {type(error).__name__}", flush=True)
        return None


def splits_and_addressing():
    """MLA decode at the table's config: programs per SM the split count aims for, tiles that read one
    block id (block size a multiple of the tile) or one per row, cache block sizes 16 and 64."""
    for key, batch in (("v2-lite", 32), ("v2-lite", 128), ("v3", 128)):
        for block_size, aligned, waves in itertools.product((16, 64), (True, False), (1, 2, 4, 8)):
            mla_decode.ALIGNED_TILES, mla_decode.WAVES = aligned, waves
            point = mla_decode_point(SHAPES[key], batch, 4096, False, block_size, "cuda")
            print(f"MLA decode {key} B={batch} ctx=4096 bf16 block {block_size} aligned {aligned} waves {waves}: "
                  f"{point.microseconds:.1f} us {point.kv_tb_per_s:.2f} TB/s {point.tflops:.0f} TFLOP/s "
                  f"({point.baseline})", flush=True)
    mla_decode.ALIGNED_TILES, mla_decode.WAVES = True, 2


def main():
    if "--splits" in sys.argv:
        return splits_and_addressing()
    for key, batch, context in MLA_POINTS:
        heads = SHAPES[key].num_heads
        for fp8 in (False, True):
            default = mla_decode.mla_decode_config(heads, torch.float8_e4m3fn if fp8 else torch.bfloat16)
            results = [(c, attempt(time_mla, key, batch, context, fp8, c)) for c in mla_variants(heads)]
            report(f"MLA decode {key} B={batch} ctx={context} {'fp8 (fp16 products)' if fp8 else 'bf16'}", results, default)
            if fp8:
                slow = attempt(time_mla, key, batch, context, True, default, False)
                print(f"  fp8 with bf16 products at the default: {slow.microseconds:.1f} us" if slow else "  (bf16 products: n/a)")
            torch.cuda.empty_cache()
    for key, batch, context in GQA_POINTS:
        group = SHAPES[key].num_heads // SHAPES[key].num_kv_heads
        for fp8 in (False, True):
            default = gqa_paged.paged_decode_config(group)
            variants = [gqa_paged.DecodeConfig(16, n, w, s) for n, w, s in itertools.product([32, 64, 128], [2, 4, 8], [2, 3, 4])]
            results = [(c, attempt(time_gqa, key, batch, context, fp8, c)) for c in variants]
            report(f"GQA decode {key} B={batch} ctx={context} {'fp8 (fp16 products)' if fp8 else 'bf16'}", results, default)
            if fp8:
                slow = attempt(time_gqa, key, batch, context, True, default, False)
                print(f"  fp8 with bf16 products at the default: {slow.microseconds:.1f} us" if slow else "  (bf16 products: n/a)")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
