#!/usr/bin/env bash
# Batch-1 decode of V2-Lite and Qwen3-30B-A3B with the step profile, after the routing kernels' counting
# became one relaxed atomic per token; the routing CUDA tests first. Usage (device): bash scripts/issue13_b1.sh
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
T="$OUT/table.txt"; : > "$T"
timeout 60 python3 -m pytest tests/gpu/test_kernels_cuda.py -q -p no:cacheprovider -k routing 2>&1 | tail -2 >> "$T"
for model in deepseek-v2-lite qwen3-30b-a3b; do
  echo "== latency $model b1" >> "$T"
  timeout 120 python3 -m moeserve bench latency --load-format dummy --dtype bfloat16 --device cuda --max-model-len 4096 \
    --model $model --batch-size 1 --input-len 256 --output-len 128 --num-iters 3 --num-iters-warmup 1 --profile \
    --output-json "$OUT/latency_${model}_b1.json" 2>&1 | tee -a "$OUT/latency.log" \
    | grep -E "^\| moeserve|steady decode|_softmax_topk|_grouped_topk|busy time" >> "$T"
done
echo "== results"; cat "$T"
