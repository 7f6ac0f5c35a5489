"""Block configurations of the quantized dense-linear kernel at decode sizes: every (block_n, split_k, stages, and
for FP8 the product transposed or not) at 1 and 16 rows on V2-Lite's, Qwen3's and V3's dense shapes (fused ones
too), against dense_config's choice and bf16 cuBLAS, timed as CUDA-graph replays over enough weight copies to defeat
L2. Arguments, if any: only the shapes whose names contain one of them.
Usage: PYTHONPATH=. python3 scripts/probes/quant_linear_sweep.py [v2lite ...]"""
import itertools
import sys

import torch
import torch.nn.functional as F

from moeserve.bench.timing import per_copy_ms
from moeserve.kernels.moe_gemm import GemmConfig, weight_format
from moeserve.kernels.quant_linear import dense_config, quantized_gemm
from moeserve.ops.linear import quantized_linear_reference
from moeserve.quant.formats import quantized

SHAPES = {"v2lite q_proj": (3072, 2048), "v2lite o_proj": (2048, 2048), "v2lite kv_a": (576, 2048),
          "v2lite q+kv_a": (3648, 2048), "v2lite gate+up": (5632, 2048), "v3 q_a+kv_a": (2112, 7168),
          "qwen3 qkv": (5120, 2048), "qwen3 o_proj": (2048, 4096), "v3 q_b": (24576, 1536),
          "v3 o_proj": (7168, 16384)}


sms = torch.cuda.get_device_properties(0).multi_processor_count
print(f"{'shape':16} {'fmt':5} {'rows':>4} {'bf16 us':>8} {'default us':>10} {'best us':>8}  best (block_n, split_k, stages)")
chosen = {name: shape for name, shape in SHAPES.items() if not sys.argv[1:] or any(a in name for a in sys.argv[1:])}
for (name, (n, k)), fmt in itertools.product(chosen.items(), ("fp8", "nvfp4")):
    copies = max(2, min(32, 300 * 2**20 // (n * k * 2)))
    dense = [torch.randn(n, k, device="cuda").bfloat16() for _ in range(copies)]
    weights = [quantized(fmt, w.float() * 0.02) for w in dense]
    for rows in (1, 16):
        x = torch.randn(rows, k, device="cuda").bfloat16()
        expected = quantized_linear_reference(x, weights[0]).float()
        bf16 = 1000 * per_copy_ms(lambda i: F.linear(x, dense[i]), copies)
        default = dense_config(rows, n, k, sms, weight_format(weights[0]))
        times = {}
        swaps = (False, True) if fmt == "fp8" else (False,)
        for block_n, split_k, stages, swap in itertools.product((16, 32, 64, 128), (1, 2, 4, 8), (3, 4), swaps):
            config = GemmConfig(block_m=16, block_n=block_n, block_k=128, num_stages=stages, split_k=split_k,
                                swap_ab=swap)
            try:
                actual = quantized_gemm(x, weights[0], config=config).float()
                if not ((actual - expected).norm() <= 1e-2 * expected.norm()):
                    continue
                times[config] = 1000 * per_copy_ms(lambda i: quantized_gemm(x, weights[i], config=config), copies)
            except Exception:  # shared memory, etc.
                continue
        best = min(times, key=times.get)
        print(f"{name:16} {fmt:5} {rows:4d} {bf16:8.1f} {times.get(default, float('nan')):10.1f} {times[best]:8.1f}"
              f"  ({best.block_n}, {best.split_k}, {best.num_stages}{', swapped' if best.swap_ab else ''})", flush=True)
