"""Compile the attention kernels for Hopper (sm_90) without a GPU, at the real models' shapes and the block
sizes their wrappers choose, and print per config: registers, spills (STL/LDL), shared memory, and whether
tl.dot became wgmma (HGMMA) or mma.sync (HMMA). Uses scripts/kernel_sass.summary.

  python scripts/attention_sass.py

As at launch, pointers and strides are declared divisible by 16 (except those the shapes leave unaligned),
and the unit strides of the head dim are the constant 1 that Triton specializes them to.
"""

import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).parent))
from kernel_sass import summary  # noqa: E402

from moeserve.kernels.attention.flash_prefill import (  # noqa: E402
    SHARED_MEMORY, _flash_varlen_kernel, _merge_kernel, flash_config, head_dim_parts)
from moeserve.kernels.attention.gqa_paged import (  # noqa: E402
    MAX_SPLITS, _merge_splits_kernel, _paged_decode_kernel, _paged_prefill_kernel, paged_decode_config,
    paged_prefill_config)

CACHE_POINTER = {"bf16": "*bf16", "fp8": "*fp8e4nv"}


def compile_for_hopper(kernel, types: dict, constants: dict, unaligned=(), num_warps=4, num_stages=3):
    """types: every runtime argument's type; constants: the rest (constexprs and arguments specialized to 1)."""
    names = kernel.arg_names
    signature = {name: types.get(name, "constexpr") for name in names}
    missing = [name for name in names if name not in types and name not in constants]
    if missing:
        raise ValueError(f"no type or value for {missing}")
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in types
             if name not in unaligned and types[name] not in ("fp32",)}
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def report(name: str, compiled) -> None:
    shared = compiled.metadata.shared
    verdict = "ok" if shared <= SHARED_MEMORY else "OVER THE LIMIT"
    print(f"{name}: {summary(compiled)}, shared {shared} B ({verdict})")


def flash_varlen(dqk: int, dv: int) -> None:
    """MLA prefill: q [T, H, Dqk], k [T, H, Dqk], v a view of kv_b_proj's [T, H, nope + Dv] output. The
    head count (16 for V2-Lite, 128 for V3) is a grid axis: one kernel serves both."""
    config = flash_config(dqk, dv)
    d_main, d_tail = head_dim_parts(dqk)
    types = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", out_ptr="*bf16", lse_ptr="*fp32", cu_q_ptr="*i32",
                 cu_k_ptr="*i32", qk_scale="fp32",
                 **dict.fromkeys(["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                  "stride_ot", "stride_oh", "stride_lh"], "i32"))
    for causal in (True, False):
        constants = dict(heads_per_kv=1, stride_qd=1, stride_kd=1, stride_vd=1, BLOCK_M=config.block_m,
                         BLOCK_N=config.block_n, D_MAIN=d_main, D_TAIL=d_tail, DV=dv, CAUSAL=causal, PRECISION="tf32")
        compiled = compile_for_hopper(_flash_varlen_kernel, types, constants, unaligned=("stride_lh",),
                                      num_warps=config.num_warps, num_stages=config.num_stages)
        report(f"flash varlen H 16 / 128 Dqk {dqk} = {d_main} + {d_tail} Dv {dv} causal {causal:d}, "
               f"{config.block_m}x{config.block_n} w{config.num_warps} s{config.num_stages}", compiled)


def merge_states(dv: int) -> None:
    types = dict(out_a_ptr="*bf16", lse_a_ptr="*fp32", out_b_ptr="*bf16", lse_b_ptr="*fp32", out_ptr="*bf16",
                 lse_ptr="*fp32", num_heads="i32",
                 **dict.fromkeys(["stride_at", "stride_ah", "stride_bt", "stride_bh", "stride_ot", "stride_oh",
                                  "stride_lse_a", "stride_lse_b", "stride_lse"], "i32"))
    compiled = compile_for_hopper(_merge_kernel, types, dict(BLOCK_H=16, DV=dv),
                                  unaligned=("stride_lse_a", "stride_lse_b", "stride_lse"))
    report(f"merge attention states Dv {dv}", compiled)


def paged_types(cache: str) -> dict:
    """Both paged kernels' common arguments: q [T, Hq, 128], caches [blocks, 16, Hk, 128] (views of one
    [blocks, 16, 2, Hk, 128] tensor)."""
    return dict(q_ptr="*bf16", k_cache_ptr=CACHE_POINTER[cache], v_cache_ptr=CACHE_POINTER[cache],
                block_table_ptr="*i32", seq_lens_ptr="*i32", kv_scale_ptr="*fp32", qk_scale="fp32",
                sliding_window="i32", chunk_size="i32", group_size="i32",
                **dict.fromkeys(["stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh",
                                 "stride_bt"], "i32"))


def masks():
    """(name, HAS_WINDOW, HAS_CHUNK): plain causal (Qwen3, Mixtral), and Llama 4's chunked layers."""
    return ("causal", False, False), ("chunked", False, True)


def paged_prefill(group_size: int, cache: str) -> None:
    config = paged_prefill_config(1024 * group_size)  # a long prefill chunk: the 128-row tiles
    types = dict(paged_types(cache), out_ptr="*bf16", query_start_ptr="*i32",
                 **dict.fromkeys(["stride_qt", "stride_qh", "stride_ot", "stride_oh"], "i32"))
    for mask, window, chunk in masks():
        constants = dict(stride_qd=1, stride_kd=1, stride_vd=1, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                         D=128, BLOCK_SIZE=16, HAS_WINDOW=window, HAS_CHUNK=chunk, FP8=cache == "fp8",
                         PRECISION="tf32")
        compiled = compile_for_hopper(_paged_prefill_kernel, types, constants, unaligned=("group_size", "stride_bt"),
                                      num_warps=config.num_warps, num_stages=config.num_stages)
        report(f"paged prefill G {group_size} {cache} cache {mask}, {config.block_m}x{config.block_n} "
               f"w{config.num_warps} s{config.num_stages}", compiled)


def paged_decode(group_size: int, cache: str) -> None:
    config = paged_decode_config(group_size)
    types = dict(paged_types(cache), part_out_ptr="*fp32", part_lse_ptr="*fp32", num_splits="i32",
                 **dict.fromkeys(["stride_qb", "stride_qh", "stride_pb", "stride_ph", "stride_ps", "stride_lb",
                                  "stride_lh"], "i32"))
    for mask, window, chunk in masks():
        constants = dict(stride_qd=1, stride_kd=1, stride_vd=1, BLOCK_H=config.block_h, BLOCK_N=config.block_n,
                         D=128, BLOCK_SIZE=16, HAS_WINDOW=window, HAS_CHUNK=chunk, FP8=cache == "fp8",
                         PRECISION="tf32")
        compiled = compile_for_hopper(_paged_decode_kernel, types, constants,
                                      unaligned=("group_size", "num_splits", "stride_bt", "stride_lb", "stride_lh"),
                                      num_warps=config.num_warps, num_stages=config.num_stages)
        report(f"paged decode G {group_size} {cache} cache {mask}, {config.block_h}x{config.block_n} "
               f"w{config.num_warps} s{config.num_stages}", compiled)


def merge_splits() -> None:
    types = dict(part_out_ptr="*fp32", part_lse_ptr="*fp32", out_ptr="*bf16", num_splits="i32",
                 **dict.fromkeys(["stride_pb", "stride_ph", "stride_ps", "stride_lb", "stride_lh", "stride_ob",
                                  "stride_oh"], "i32"))
    compiled = compile_for_hopper(_merge_splits_kernel, types, dict(SPLITS=MAX_SPLITS, D=128),
                                  unaligned=("num_splits", "stride_lb", "stride_lh"))
    report(f"paged decode merge of {MAX_SPLITS} splits D 128", compiled)


if __name__ == "__main__":
    flash_varlen(192, 128)
    flash_varlen(128, 128)  # a power-of-two head dim (GQA-style use)
    merge_states(128)
    for group in (8, 4):
        for cache in ("bf16", "fp8"):
            paged_prefill(group, cache)
            paged_decode(group, cache)
    merge_splits()
