"""V2-Lite batch-1 decode with FP8 weights under variants of where the activations are quantized, and of the
dense decode blocks: VARIANT in
  base      - as built
  dense-q1  - dense linears quantize first (quantize_fp8_groups), then the W8A8 GEMM
Measured on an H200 on 2026-12-04 (docs/perf.md) with the variants of then: in-GEMM quantization in the dense
linears and the experts' gate_up 191.4 tok/s; dense quantizing first 144.1; the experts quantizing first 201.6;
dense blocks 128 wide with K slices down to 256: 208.9. The last two are built in now.
Usage (device): PYTHONPATH=. python3 scripts/probes/fp8_decode_variants.py VARIANT [fp8|nvfp4 [BATCH]]"""
import sys

from moeserve.cli import main
from moeserve.kernels import quant_linear

variant = sys.argv[1]
if variant == "dense-q1":
    quant_linear.IN_GEMM_QUANTIZATION_MAX_ROWS = 0
sys.exit(main(["bench", "latency", "--load-format", "dummy", "--dtype", "bfloat16", "--device", "cuda",
               "--max-model-len", "4096", "--model", "deepseek-v2-lite", "--input-len", "256",
               "--output-len", "64", "--num-iters", "2", "--num-iters-warmup", "1", "--quantization", sys.argv[2] if len(sys.argv) > 2 else "fp8",
               "--batch-size", sys.argv[3] if len(sys.argv) > 3 else "1"]))
