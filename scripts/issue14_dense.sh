#!/usr/bin/env bash
# Issue 14 item 1 on the GPU: the quantized dense-linear kernel's CUDA tests, its timings against
# dequantize + cuBLAS and bf16 cuBLAS at V3 shapes, and V2-Lite batch 1 with FP8 weights (quantized on
# load) against bf16. Usage (device): bash scripts/issue14_dense.sh   (table last, logs under $OUT)
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
T="$OUT/table.txt"; : > "$T"
timeout 100 python3 -m pytest tests/gpu/test_quant_cuda.py -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -2 >> "$T"
timeout 80 python3 scripts/probes/quant_linear_bench.py > "$OUT/quant_linear_bench.txt" 2>&1; cat "$OUT/quant_linear_bench.txt" >> "$T"
for q in fp8 ""; do
  echo "== latency v2-lite b1 ${q:-bf16}" >> "$T"
  timeout 100 python3 -m moeserve bench latency --load-format dummy --dtype bfloat16 --device cuda --max-model-len 4096 \
    --model deepseek-v2-lite --batch-size 1 --input-len 256 --output-len 64 --num-iters 2 --num-iters-warmup 1 \
    ${q:+--quantization $q} 2>&1 | tee -a "$OUT/latency.log" | grep -E "^\| moeserve|Error|error" | tail -3 >> "$T"
done
echo "== results"; cat "$T"
