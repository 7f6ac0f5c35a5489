#!/usr/bin/env bash
# One device call for what the last changes need: their CUDA tests, tiny-llama4 against the CPU per path,
# V2-Lite batch 1 with the transformers yardstick, the server (wheels carried as .whl), Qwen3 offline.
# Usage (device): bash scripts/issue13_last.sh   (logs under $OUT, the table last)
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
T="$OUT/table.txt"; : > "$T"
timeout 150 python3 -m pytest tests/gpu/test_small_ops_cuda.py tests/gpu/test_attention_cuda.py tests/gpu/test_cuda_graphs.py \
  -q -p no:cacheprovider -x 2>&1 | tee "$OUT/gpu_tests.log" | tail -3 >> "$T"
timeout 60 python3 scripts/probes/llama4_cuda.py 2>&1 | grep "^llama4" >> "$T"
echo "== latency v2-lite b1" >> "$T"
timeout 100 python3 -m moeserve bench latency --load-format dummy --dtype bfloat16 --device cuda --max-model-len 4096 \
  --model deepseek-v2-lite --batch-size 1 --input-len 256 --output-len 128 --num-iters 3 --num-iters-warmup 1 \
  --profile --compare-hf --output-json "$OUT/latency_v2-lite_b1.json" > "$OUT/latency.log" 2>&1
grep -E "^\| (moeserve|transformers)|^profile of|^busy|cannot" "$OUT/latency.log" >> "$T"
RATES="inf" bash scripts/serve_gpu.sh > /dev/null 2>&1; cat "$OUT/serve_table.txt" >> "$T"
echo "== throughput Qwen3-30B-A3B 64 x 256 in / 64 out" >> "$T"
timeout 70 python3 -m moeserve bench throughput --model qwen3-30b-a3b --load-format dummy --dtype bfloat16 \
  --device cuda --max-model-len 4096 --num-prompts 64 --input-len 256 --output-len 64 2>&1 \
  | tee "$OUT/throughput.log" | grep -E "moeserve:" >> "$T"
echo "== results"; cat "$T"
