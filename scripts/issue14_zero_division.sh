#!/usr/bin/env bash
# After the in-GEMM FP8 quantization stopped dividing zeros (the padded rows of decode tiles sent the correctly
# rounded division down its slow path: 1 row measured 2x slower than 16): the quantization CUDA tests, the
# dense kernel bench and sweep, V2-Lite FP8 / bf16 latency, and the FP8 batch-1 step's kernels.
# Usage (device): bash scripts/issue14_zero_division.sh   (table last, logs under $OUT)
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
timeout 120 python3 -m pytest tests/gpu/test_quant_cuda.py -q -p no:cacheprovider -rf 2>&1 | tee "$OUT/quant_cuda.log" | tail -3
timeout 60 python3 scripts/probes/step_kernels.py deepseek-v2-lite 1 fp8 > "$OUT/kernels_fp8.txt" 2> "$OUT/kernels_fp8.err"
head -1 "$OUT/kernels_fp8.txt"
OUT="$OUT" PART=bench bash scripts/issue14_next.sh
