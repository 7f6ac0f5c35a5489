"""Quantized dense linears at DeepSeek-V3 shapes: the dense kernel against the dequantize-then-cuBLAS
path and against bf16 cuBLAS on the same shape (the yardstick), timed as CUDA-graph replays over enough
weight copies that none stays in L2. Usage: PYTHONPATH=. python3 scripts/probes/quant_linear_bench.py"""
import torch
import torch.nn.functional as F

from moeserve.bench.timing import per_copy_ms
from moeserve.kernels.quant_linear import quantized_gemm
from moeserve.ops.linear import dequantized_linear
from moeserve.quant.formats import quantized

SHAPES = {"q_b 1536->24576": (24576, 1536), "o_proj 16384->7168": (7168, 16384), "kv_a 7168->576": (576, 7168),
          "dense down 18432->7168": (7168, 18432)}


print(f"{'shape':24} {'fmt':5} {'rows':>5} {'kernel us':>10} {'TB/s':>5} {'TFLOP/s':>7} {'dequant+cuBLAS us':>17} {'bf16 cuBLAS us':>14}")
for name, (n, k) in SHAPES.items():
    copies = max(2, min(16, 300 * 2**20 // (n * k * 2)))
    dense = [torch.randn(n, k, device="cuda").bfloat16() for _ in range(copies)]
    for fmt in ("fp8", "nvfp4"):
        weights = [quantized(fmt, w.float() * 0.02) for w in dense]
        nbytes = sum(p.numel() * p.element_size() for p in weights[0].parameters())
        for rows in (1, 16, 64, 256, 1024):
            x = torch.randn(rows, k, device="cuda").bfloat16()
            kernel = 1000 * per_copy_ms(lambda i: quantized_gemm(x, weights[i]), copies)
            reference = 1000 * per_copy_ms(lambda i: dequantized_linear(x, weights[i]), copies)
            bf16 = 1000 * per_copy_ms(lambda i: F.linear(x, dense[i]), copies)
            print(f"{name:24} {fmt:5} {rows:5d} {kernel:10.1f} {nbytes / kernel / 1e6:5.2f} "
                  f"{2 * rows * n * k / kernel / 1e6:7.1f} {reference:17.1f} {bf16:14.1f}", flush=True)
