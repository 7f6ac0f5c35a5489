#!/usr/bin/env bash
# Issue 13's GPU check in one device call: the CUDA tests of what changed, then the target points
# (bench latency with --profile, bench throughput with and without graphs), a short table last.
# Usage (device): bash scripts/issue13_gpu.sh   (logs and JSON under $OUT); SHORT=1: the changed tests
# (stopping at the first failure), V2-Lite at batch 1 and 128 and the offline point with graphs only.
# NO_HF=1: without the transformers yardstick. EAGER_TOO=1: the offline point also with --enforce-eager.
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
T="$OUT/table.txt"; : > "$T"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$T"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$T"
SHORT=${SHORT:-}; NO_HF=${NO_HF:-}
HF=--compare-hf; EAGER=${EAGER_TOO:+--enforce-eager}; [ -n "$SHORT$NO_HF" ] && HF= && EAGER=
TESTS=${TESTS:-"tests/gpu/test_async_cuda.py tests/gpu/test_small_ops_cuda.py tests/gpu/test_sampler_cuda.py tests/gpu/test_cuda_graphs.py"}
[ -z "$SHORT" ] && TESTS="$TESTS tests/gpu/test_engine_cuda.py tests/gpu/test_attention_cuda.py"
timeout ${TEST_SECONDS:-200} python3 -m pytest $TESTS -q -p no:cacheprovider -rs ${SHORT:+-x} \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -4 | tee -a "$T"
latency() {  # label, then arguments of moeserve bench latency
  local label=$1; shift
  echo "== latency $label" >> "$T"
  timeout 150 python3 -m moeserve bench latency --load-format dummy --dtype bfloat16 --device cuda --max-model-len 4096 \
    --output-len 128 --profile "$@" --output-json "$OUT/latency_${label// /_}.json" 2>&1 | tee -a "$OUT/latency.log" \
    | grep -E "^\| (moeserve|transformers)|^profile of|^busy|kernels per step|cannot" >> "$T"
}
latency "v2-lite b1" --model deepseek-v2-lite --batch-size 1 --input-len 256 --num-iters 3 --num-iters-warmup 1 $HF
[ -n "${ONLY_B1:-}" ] && { echo "== results"; cat "$T"; exit 0; }
latency "v2-lite b128" --model deepseek-v2-lite --batch-size 128 --input-len 512 --num-iters 2 --num-iters-warmup 1
for mode in "" $EAGER; do
  echo "== throughput V2-Lite 128 x 256 in / 64 out ${mode:-graphs}" >> "$T"
  timeout 120 python3 -m moeserve bench throughput --model deepseek-v2-lite --load-format dummy --dtype bfloat16 \
    --device cuda --max-model-len 4096 --num-prompts 128 --input-len 256 --output-len 64 $mode 2>&1 \
    | tee -a "$OUT/throughput.log" | grep -E "Captured|moeserve:" >> "$T"
done
[ -n "$SHORT" ] && { echo "== results"; cat "$T"; exit 0; }
latency "qwen3 b1" --model qwen3-30b-a3b --batch-size 1 --input-len 256 --num-iters 3 --num-iters-warmup 1
latency "qwen3 b64" --model qwen3-30b-a3b --batch-size 64 --input-len 512 --num-iters 2 --num-iters-warmup 1
echo "== throughput Qwen3-30B-A3B 64 x 256 in / 64 out" >> "$T"
timeout 150 python3 -m moeserve bench throughput --model qwen3-30b-a3b --load-format dummy --dtype bfloat16 \
  --device cuda --max-model-len 4096 --num-prompts 64 --input-len 256 --output-len 64 2>&1 \
  | tee -a "$OUT/throughput.log" | grep -E "Captured|moeserve:" >> "$T"
echo "== results"; cat "$T"
