#!/usr/bin/env bash
# Issue 13's closing device call, part 1: the CUDA tests of the last changes (no compile after the warm-up),
# the server's TTFT and TPOT, Qwen3 offline at its own max_model_len and three times at 4,096 (the spread).
# Usage (device, wheels carried as .whl): bash scripts/issue13_next.sh   (table last, logs under $OUT)
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
T="$OUT/table.txt"; : > "$T"
timeout 260 python3 -m pytest tests/gpu/test_no_compiles_after_warm_up.py tests/gpu/test_attention_cuda.py \
  tests/gpu/test_kernels_cuda.py tests/gpu/test_engine_cuda.py tests/gpu/test_cuda_graphs.py -q -p no:cacheprovider \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -3 >> "$T"
RATES="inf" bash scripts/serve_gpu.sh > /dev/null 2>&1; cat "$OUT/serve_table.txt" >> "$T"
grep -E "Warmed up|Captured|KV cache budget" "$OUT/serve.log" >> "$T"
echo "== Qwen3 offline at its own max_model_len (the memory profile at 16,384 tokens as 8 x 2,048)" >> "$T"
timeout 90 python3 -m moeserve bench throughput --model qwen3-30b-a3b --load-format dummy --dtype bfloat16 \
  --device cuda --num-prompts 64 --input-len 256 --output-len 64 2>&1 | tee -a "$OUT/throughput.log" \
  | grep -E "KV cache budget|Warmed up|moeserve:|Error" >> "$T"
for i in 1 2 3; do
  timeout 70 python3 -m moeserve bench throughput --model qwen3-30b-a3b --load-format dummy --dtype bfloat16 \
    --device cuda --max-model-len 4096 --num-prompts 64 --input-len 256 --output-len 64 2>&1 \
    | tee -a "$OUT/throughput.log" | grep -E "moeserve:" >> "$T"
done
echo "== results"; cat "$T"
