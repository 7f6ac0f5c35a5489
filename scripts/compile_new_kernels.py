"""Compile the small kernels the interpreter tests (SiLU-and-mul and the top-k sum with skipped pairs, the peer-to-peer
transport) for Hopper (sm_90) without a GPU: catches what the interpreter does not (pointer casts, early returns), and
prints each kernel's SASS instruction count (loops counted once) and its global stores and loads by width (a put or
a get through a peer pointer of unknown alignment moves a byte or two at a time; v4.b32 is 16 bytes).

  PYTHONPATH=. python scripts/compile_new_kernels.py
"""
import re
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moeserve.kernels import activation, ep_transport

# integer arguments that are multiples of 16 at run time (Triton specializes on that): sizes in bytes and elements
DIVISIBLE = ("hidden", "row_bytes", "meta_words", "payload_words", "row_words", "stride_y", "max_tokens", "intermediate",
             "row_stride", "code_bytes")


def build(fn, sig, constants, warps=4):
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*") or n in DIVISIBLE}
    k = triton.compile(ASTSource(fn, sig, constants, attrs), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    stores = Counter(re.findall(r"st\.global(?:\.[a-z0-9]+)*", k.asm["ptx"]))  # the widths the stores got
    loads = Counter(re.findall(r"ld\.global(?:\.[a-z0-9]+)*", k.asm["ptx"]))
    sass = re.findall(r"^[-0-9a-f]{2}:[-0-9]:[-0-9]:[-Y]:\d+\s", k.asm["sass"], re.M)  # nvdisasm's control column
    print(fn.__name__, constants, f"compiled for sm_90; {len(sass)} SASS instructions; stores:", dict(stores), "loads:",
          dict(loads))

c = "constexpr"
for q in (False, True):
    build(activation._silu_and_mul_kernel,
          dict(gate_up_ptr="*bf16", out_ptr="*fp8e4nv" if q else "*bf16", scale_ptr="*fp32", slots_ptr="*i64", intermediate="i32",
               stride_in="i32", stride_out="i32", stride_scale="i32", BLOCK=c, QUANTIZE=c, ROUND_SILU=c, ROWS_IN_USE=c),
          dict(BLOCK=128, QUANTIZE=q, ROUND_SILU=False, ROWS_IN_USE=True))
build(activation._sum_over_k_kernel, dict(y_ptr="*bf16", slots_ptr="*i64", out_ptr="*bf16", hidden="i32", TOP_K=c, BLOCK=c, ROWS_IN_USE=c),
      dict(TOP_K=8, BLOCK=1024, ROWS_IN_USE=True))
build(ep_transport._route_block_kernel,
      dict(ids_ptr="*i64", weights_ptr="*fp32", replica_slots_ptr="*i64", replica_count_ptr="*i64", local_index_ptr="*i32",
           meta_ptr="*i32", block_counts_ptr="*i32", num_tokens="i32", me="i32", slots_per_rank="i32", stride_replicas="i32",
           EP=c, EP_POW2=c, TOP_K=c, BLOCK_T=c, K_POW2=c), dict(EP=8, EP_POW2=8, TOP_K=8, BLOCK_T=32, K_POW2=8))
build(ep_transport._route_offsets_kernel,
      dict(local_index_ptr="*i32", block_counts_ptr="*i32", counts_table_ptr="*i64", num_tokens="i32", num_blocks="i32",
           me="i32", EP=c, EP_POW2=c, BLOCK_T=c, BLOCKS_POW2=c), dict(EP=8, EP_POW2=8, BLOCK_T=512, BLOCKS_POW2=8))
build(ep_transport._put_counts_kernel, dict(counts_table_ptr="*i64", my_counts_ptr="*i32", me="i32", EP=c, EP_POW2=c), dict(EP=8, EP_POW2=8))
for low_latency, rows in ((False, 1), (True, 1), (False, 8)):  # rows: 8 on an SM budget
    placement = dict(EP=8, EP_POW2=8, LOW_LATENCY=low_latency)
    build(ep_transport._put_rows_kernel, dict(payload_ptr="*i32", meta_ptr="*i32", local_index_ptr="*i32", counts_ptr="*i32",
          recv_table_ptr="*i64", num_tokens="i32", payload_words="i32", meta_words="i32", row_words="i32", me="i32", region_rows="i32", EP=c, EP_POW2=c,
          LOW_LATENCY=c, BLOCK=c, META_BLOCK=c, ROWS=c), dict(**placement, BLOCK=1024, META_BLOCK=16, ROWS=rows))
    build(ep_transport._put_rows_fp8_kernel, dict(x_ptr="*bf16", meta_ptr="*i32", local_index_ptr="*i32", counts_ptr="*i32",
          recv_table_ptr="*i64", num_tokens="i32", hidden="i32", meta_words="i32", row_bytes="i32", me="i32", region_rows="i32", EP=c,
          EP_POW2=c, LOW_LATENCY=c, GROUP=c, CHUNK=c, BLOCK=c, ROWS=c),
          dict(**placement, GROUP=128, CHUNK=1024, BLOCK=16, ROWS=rows))
    for nvfp4_rows, chunk in ((1, 1024), (4, 256), (1, 8192)):
        build(ep_transport._put_rows_nvfp4_kernel, dict(x_ptr="*bf16", meta_ptr="*i32", local_index_ptr="*i32", counts_ptr="*i32",
              recv_table_ptr="*i64", num_tokens="i32", hidden="i32", meta_words="i32", row_bytes="i32", me="i32", region_rows="i32",
              code_bytes="i32", EP=c, EP_POW2=c, LOW_LATENCY=c, CHUNK=c, BLOCK=c, ROWS=c, WHOLE_ROW=c),
              dict(**placement, CHUNK=chunk, BLOCK=16, ROWS=nvfp4_rows, WHOLE_ROW=chunk > 1024),
              warps=4)
for rows in (4, 8):
    for use_asm in (False, True):
        build(ep_transport._nvfp4_tokens_kernel, dict(rows_ptr="*u8", out_ptr="*bf16", in_use_ptr="*u8", num_rows="i32",
              hidden="i32", row_stride="i32", CHUNK=c, ROWS=c, SOME_ROWS=c, USE_ASM=c),
              dict(CHUNK=1024, ROWS=rows, SOME_ROWS=True, USE_ASM=use_asm))
for low_latency, rows in ((False, 1), (True, 1), (False, 8)):
    build(ep_transport._pull_results_kernel, dict(results_table_ptr="*i64", local_index_ptr="*i32", first_ptr="*i32",
          out_ptr="*bf16", num_tokens="i32", hidden="i32", me="i32", region_rows="i32", EP=c, LOW_LATENCY=c, BLOCK=c,
          ROWS=c), dict(EP=8, LOW_LATENCY=low_latency, BLOCK=1024, ROWS=rows))
