"""Compile the MLA decode and paged cache write kernels for Hopper (sm_90) without a GPU, at DeepSeek's
shapes (L = 512, R = 64), and print per kernel and config: registers, spills (STL/LDL), shared memory
(at most 232448 bytes per CTA on H100/H200) and the tensor-core instructions (HGMMA wgmma, HMMA mma.sync).

  python scripts/attention_sass_mla.py            the configs mla_decode_config chooses
  python scripts/attention_sass_mla.py --sweep    also the candidates they were chosen from (bf16, FP8)

The GPU node runs Triton 3.6 (CI 3.7): with a 3.6 wheel first on PYTHONPATH the report is the GPU's.

Integers Triton specializes as divisible by 16 at launch (pointers, the strides of 576-wide rows, the
head counts, block sizes 16 and 64) are declared so; block_size is a runtime argument, so block sizes
16 and 64 compile to one binary (both divisible by 16), and so does every context length.
"""

import itertools
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).parent))
from kernel_sass import summary  # noqa: E402

from moeserve.kernels.attention.cache_write import _cache_write_kernel  # noqa: E402
from moeserve.kernels.attention.mla_decode import (  # noqa: E402
    MERGE_SPLITS, MLADecodeConfig, _mla_decode_merge_kernel, _mla_decode_split_kernel, mla_decode_config)

RANK, ROPE = 512, 64
SHARED_LIMIT = 232448
# cache: (pointer type, torch dtype); the queries are fp32 with an fp32 cache (FMA dots), else bf16
CACHE_TYPES = {"bf16": ("*bf16", torch.bfloat16), "fp8": ("*fp8e4nv", torch.float8_e4m3fn),
               "fp32": ("*fp32", torch.float32)}
HOPPER = GPUTarget("cuda", 90, 32)


def compile_for_hopper(kernel, signature: dict, constants: dict, unaligned: tuple, warps: int, stages: int):
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if signature[n] not in ("constexpr", "fp32") and n not in unaligned}
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=HOPPER,
                          options=dict(num_warps=warps, num_stages=stages))


def split_kernel(cache: str, config: MLADecodeConfig, write_lse: bool):
    """Stage 1 with several splits (fp32 partial output and lse) or with one (bf16 output, no lse)."""
    query = "*fp32" if cache == "fp32" else "*bf16"
    pointers = dict(q_ptr=query, cache_ptr=CACHE_TYPES[cache][0], block_table_ptr="*i32", seq_lens_ptr="*i32",
                    kv_scale_ptr="*fp32", out_ptr="*fp32" if write_lse else query, lse_ptr="*fp32")
    integers = dict(num_heads="i32", qk_scale="fp32", block_size="i32", **dict.fromkeys(
        ["stride_qb", "stride_qh", "stride_cache_block", "stride_cache_offset", "stride_table", "stride_ob",
         "stride_oh", "stride_os", "stride_lb", "stride_lh"], "i32"))
    constants = dict(L=RANK, R=ROPE, BLOCK_H=config.block_h, BLOCK_N=config.block_n, FP8=cache == "fp8",
                     WRITE_LSE=write_lse, DOT_PRECISION="ieee" if cache == "fp32" else "tf32")
    signature = {**pointers, **integers, **dict.fromkeys(constants, "constexpr")}
    return compile_for_hopper(_mla_decode_split_kernel, signature, constants,
                              ("stride_table", "stride_lb", "stride_lh"), config.num_warps, config.num_stages)


def merge_kernel():
    integers = dict.fromkeys(["num_splits", "stride_pb", "stride_ph", "stride_ps", "stride_lb", "stride_lh",
                              "stride_ob", "stride_oh"], "i32")
    constants = dict(L=RANK, BLOCK_S=32, MERGE_STEP=MERGE_SPLITS)
    signature = dict(partial_ptr="*fp32", lse_ptr="*fp32", out_ptr="*bf16", **integers,
                     **dict.fromkeys(constants, "constexpr"))
    return compile_for_hopper(_mla_decode_merge_kernel, signature, constants, ("num_splits", "stride_lb", "stride_lh"),
                              4, 1)


def cache_write_kernel(cache: str, heads: int, width_a: int, width_b: int):
    """write_mla_cache (1 head: c_kv and k_pe of a bf16 projection) or write_kv_cache (K and V heads)."""
    names = ["slot_mapping_ptr", "scale_ptr", "block_size", "heads"]
    for part in "ab":
        names += [f"{part}_ptr", f"stride_{part}t", f"stride_{part}h", f"{part}_cache_ptr", f"stride_{part}cb",
                  f"stride_{part}co", f"stride_{part}ch", f"width_{part}"]
    signature = dict.fromkeys(names, "i32")
    signature.update(slot_mapping_ptr="*i32", scale_ptr="*fp32", a_ptr="*bf16", b_ptr="*bf16",
                     a_cache_ptr=CACHE_TYPES[cache][0], b_cache_ptr=CACHE_TYPES[cache][0])
    constants = dict(BLOCK_H=heads, BLOCK_A=width_a, BLOCK_B=width_b, FP8=cache == "fp8")
    signature.update(dict.fromkeys(constants, "constexpr"))
    return compile_for_hopper(_cache_write_kernel, signature, constants, ("heads",), 4, 1)


def report(name: str, kernel) -> None:
    shared = kernel.metadata.shared
    flag = "" if shared <= SHARED_LIMIT else "  OVER THE SHARED MEMORY LIMIT"
    print(f"{name}: shared {shared} B, {summary(kernel)}{flag}", flush=True)


def describe(config: MLADecodeConfig) -> str:
    return f"BLOCK_H {config.block_h}, BLOCK_N {config.block_n}, {config.num_warps} warps, {config.num_stages} stages"


def sweep_configs():
    for block_h, block_n, warps, stages in itertools.product((16, 32, 64), (16, 32, 64), (4, 8), (2, 3)):
        yield MLADecodeConfig(block_h, block_n, warps, stages)


if __name__ == "__main__":
    print(f"triton {triton.__version__}, sm_90, L {RANK}, R {ROPE}; block sizes 16 and 64: one binary")
    for cache, heads in itertools.product(CACHE_TYPES, (16, 32, 64, 128)):
        config = mla_decode_config(heads, CACHE_TYPES[cache][1])
        for write_lse in (True, False):
            splits = "split stage, several splits" if write_lse else "split stage, one split"
            report(f"mla_decode {cache} cache, H {heads}, {describe(config)}, {splits}",
                   split_kernel(cache, config, write_lse))
    report("mla_decode merge stage", merge_kernel())
    for cache in CACHE_TYPES:
        report(f"write_mla_cache {cache} cache", cache_write_kernel(cache, 1, RANK, ROPE))
        report(f"write_kv_cache {cache} cache, 8 KV heads of 128", cache_write_kernel(cache, 8, 128, 128))
    if "--sweep" in sys.argv:
        for cache, config, write_lse in itertools.product(("bf16", "fp8"), sweep_configs(), (True, False)):
            splits = "several splits" if write_lse else "one split"
            report(f"candidate {cache} cache, {describe(config)}, {splits}", split_kernel(cache, config, write_lse))
