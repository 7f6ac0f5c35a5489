#!/usr/bin/env bash
# The next device call for issue 13: the engine CUDA tests (warm-up on by default now), the server's TTFT
# with the start-up warm-up, Qwen3 offline three times (its spread) and step by step, V2-Lite batch 1.
# Usage (device, wheels carried as .whl): [PART=first] bash scripts/issue13_next.sh   (table last, logs under $OUT)
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
T="$OUT/table.txt"; : > "$T"
timeout 200 python3 -m pytest tests/gpu/test_engine_cuda.py tests/gpu/test_cuda_graphs.py tests/gpu/test_async_cuda.py \
  tests/gpu/test_small_ops_cuda.py -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -3 >> "$T"
RATES="inf" bash scripts/serve_gpu.sh > /dev/null 2>&1; cat "$OUT/serve_table.txt" >> "$T"
grep -E "Warmed up|Captured|KV cache budget" "$OUT/serve.log" >> "$T"
echo "== Qwen3 offline at its own max_model_len (the memory profile at 16,384 tokens as 8 x 2,048)" >> "$T"
timeout 90 python3 -m moeserve bench throughput --model qwen3-30b-a3b --load-format dummy --dtype bfloat16 \
  --device cuda --num-prompts 64 --input-len 256 --output-len 64 2>&1 | tee -a "$OUT/throughput.log" \
  | grep -E "KV cache budget|Warmed up|moeserve:|Error" >> "$T"
timeout 90 python3 scripts/probes/step_kernels.py deepseek-v2-lite 1 > "$OUT/v2lite_b1_kernels.txt" 2>&1
head -1 "$OUT/v2lite_b1_kernels.txt" >> "$T"
[ "${PART:-all}" = first ] && { echo "== results"; cat "$T"; exit; }
for i in 1 2 3; do
  timeout 70 python3 -m moeserve bench throughput --model qwen3-30b-a3b --load-format dummy --dtype bfloat16 \
    --device cuda --max-model-len 4096 --num-prompts 64 --input-len 256 --output-len 64 2>&1 \
    | tee -a "$OUT/throughput.log" | grep -E "moeserve:" >> "$T"
done
timeout 90 python3 scripts/probes/offline_steps.py qwen3-30b-a3b 64 256 64 2>&1 | grep -E "^step|steps" >> "$T"
echo "== results"; cat "$T"
