#!/usr/bin/env bash
# Issue 14 on one GPU, 2026-12-07: the CUDA tests of the FP8 paths (one-pass activation quantization, cuBLAS block
# scaling, one weight scale a tile), dense FP8 linears by path, the MoE layer (bf16 / FP8) against torch's grouped
# GEMMs, and V2-Lite end to end with FP8 weights against bf16. Logs under $OUT; the table last.
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
T="$OUT/table.txt"; : > "$T"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$T"
timeout 140 python3 -m pytest tests/gpu/test_quant_cuda.py tests/gpu/test_kernels_cuda.py -q -p no:cacheprovider -rf \
  > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?" >> "$T"; grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -8 >> "$T"
timeout 90 python3 scripts/probes/fp8_cublas_blockwise.py > "$OUT/dense.txt" 2>&1
grep -E "^\||Error" "$OUT/dense.txt" >> "$T"
for batch in 1 128; do
  for q in fp8 ""; do
    echo "== latency v2-lite b$batch ${q:-bf16}" >> "$T"
    timeout ${LATENCY_TIMEOUT:-75} python3 -m moeserve bench latency --load-format dummy --dtype bfloat16 --device cuda \
      --max-model-len 4096 --model deepseek-v2-lite --batch-size $batch --input-len 256 --output-len 64 \
      --num-iters 2 --num-iters-warmup 1 ${q:+--quantization $q} >> "$OUT/latency.log" 2>&1
    grep -E "^\| moeserve|Error" "$OUT/latency.log" | tail -1 >> "$T"
  done
done
timeout ${MOE_TIMEOUT:-60} python3 -m moeserve bench moe --model deepseek-v3 --local-experts 32 --tokens 1,128,8192 --dtype bf16,fp8 \
  > "$OUT/moe.txt" 2>&1
grep -E "^\||Error" "$OUT/moe.txt" >> "$T"
cat "$T"
