"""Compile the grouped GEMM for Hopper (sm_90) without a GPU and count what its SASS holds: wgmma
(HGMMA bf16 / QGMMA fp8), mma.sync (HMMA), async copies (LDGSTS), spills (STL/LDL), registers, and the
wgmma waits in the PTX. Uses the ptxas / nvdisasm / cuobjdump shipped in the triton wheel.

  python scripts/kernel_sass.py FORMAT BLOCK_M BLOCK_N BLOCK_K WARPS STAGES   (FORMAT: 0 bf16, 1 fp8, 2 nvfp4)

Pointers, N, K and the large strides are declared divisible by 16, as Triton specializes them at launch
for DeepSeek-V3 shapes; without that the loads are not vectorized and the listing is not the one that runs.
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moeserve.kernels.moe_gemm import _moe_gemm_kernel

POINTER_TYPES = {  # format -> (activations, weights, weight scales)
    0: ("*bf16", "*bf16", "*fp32"),
    1: ("*fp8e4nv", "*fp8e4nv", "*fp32"),
    2: ("*bf16", "*u8", "*fp8e4nv"),
}
ONE_SCALE = os.environ.get("ONE_SCALE", "0") == "1"  # FP8: the N tile in one weight scale block
SWAP_AB = os.environ.get("SWAP_AB", "0") == "1"  # the product computed as W @ a^T
NIBBLES = os.environ.get("NIBBLES", "1") == "1"  # NVFP4: codes to bf16 by bit operations (0: the fp32 path)
UNALIGNED = ("stride_as", "stride_wsn", "stride_wse", "stride_ge", "num_rows", "rows_per_a_row")


def signature(fmt: int) -> dict:
    a, w, w_scale = POINTER_TYPES[fmt]
    pointers = dict(a_ptr=a, a_scale_ptr="*fp32", w_ptr=w, w_scale_ptr=w_scale, w_global_ptr="*fp32", out_ptr="*bf16",
                    row_weight_ptr="*fp32", sorted_rows_ptr="*i32", block_expert_ptr="*i32", num_padded_ptr="*i32")
    integers = dict.fromkeys(["N", "K", "num_rows", "rows_per_a_row", "n_part", "stride_am", "stride_as"], "i32")
    integers.update(stride_we="i64", **dict.fromkeys(["stride_wn", "stride_wse", "stride_wsn", "stride_ge", "stride_om"], "i32"))
    constants = dict.fromkeys(["BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "FORMAT", "WEIGHTED", "PRECISION", "DENSE", "TILE_IN_ONE_SCALE_BLOCK", "SWAP_AB", "NIBBLES_TO_BF16", "USE_ASM", "EVEN_K"],
                              "constexpr")
    split_k_sum = dict(partials_ptr="*fp32", arrivals_ptr="*i32", REDUCE_IN_KERNEL="constexpr")
    return {**pointers, **integers, **constants, **split_k_sum}


def compile_for_hopper(fmt: int, block_m: int, block_n: int, block_k: int, warps: int, stages: int):
    sig = signature(fmt)
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n] != "constexpr" and n not in UNALIGNED}
    constants = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=1, SPLIT_K=1, FORMAT=fmt,
                     WEIGHTED=False, PRECISION="tf32", DENSE=False, TILE_IN_ONE_SCALE_BLOCK=ONE_SCALE, SWAP_AB=SWAP_AB,
                     NIBBLES_TO_BF16=fmt == 2 and NIBBLES, USE_ASM=True,
                     EVEN_K=os.environ.get("EVEN_K", "1") == "1", REDUCE_IN_KERNEL=False)
    return triton.compile(ASTSource(_moe_gemm_kernel, sig, constants, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def summary(kernel) -> str:
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([tools / "nvdisasm", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tools / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", sass)
    count = {name: sum(op == name for op in opcodes) for name in ("HGMMA", "QGMMA", "HMMA", "LDGSTS", "STL", "LDL", "STS", "LDS", "SHFL", "PRMT", "LOP3", "F2F", "I2F")}
    waits = sorted(set(re.findall(r"wgmma.wait_group.sync.aligned (\d+)", kernel.asm["ptx"])))
    registers = re.search(r"REG:(\d+)", usage)
    return (f"instructions {len(opcodes)}, " + ", ".join(f"{k} {v}" for k, v in count.items())
            + f", registers {registers.group(1) if registers else '?'}, wgmma.wait_group {'/'.join(waits) or '-'}")


if __name__ == "__main__":
    fmt, block_m, block_n, block_k, warps, stages = (int(v) for v in sys.argv[1:7])
    print(f"format {fmt}, {block_m}x{block_n}x{block_k}, {warps} warps, {stages} stages:",
          summary(compile_for_hopper(fmt, block_m, block_n, block_k, warps, stages)))
