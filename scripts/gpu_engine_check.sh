#!/usr/bin/env bash
# One device call: the engine's CUDA tests, the CPU suite on the GPU node's package versions, and
# throughput benchmarks (tiny model on CPU and CUDA; real-shape presets with random weights on CUDA).
# Run from the repo root: bash scripts/gpu_engine_check.sh   (logs under $OUT when set)
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

python3 -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -2
# the CPU suite, on this node's package versions (CUDA hidden: these tests expect the CPU)
CUDA_VISIBLE_DEVICES= python3 -m pytest tests -q -p no:cacheprovider --ignore=tests/gpu 2>&1 | tee "$OUT/cpu_suite_on_gpu_node.log" | tail -4

bench() {  # label, then arguments of moeserve bench throughput
  local label=$1; shift
  local result
  result=$(timeout 240 python3 -m moeserve bench throughput "$@" 2>&1 | tee -a "$OUT/bench.log" | grep -E "KV cache:|requests in" | tr '\n' ' ')
  echo "$label | $result" >> "$OUT/bench_table.txt"
}
: > "$OUT/bench_table.txt"
bench "tiny-deepseek-v3 cpu fp32" --model tiny-deepseek-v3 --device cpu --num-prompts 64 --input-len 128 --output-len 64
bench "tiny-deepseek-v3 cuda fp32" --model tiny-deepseek-v3 --device cuda --num-prompts 64 --input-len 128 --output-len 64
bench "deepseek-v2-lite dummy cuda bf16" --model deepseek-v2-lite --load-format dummy --device cuda --dtype bfloat16 --max-model-len 8192 --num-prompts 64 --input-len 256 --output-len 64
bench "qwen3-30b-a3b dummy cuda bf16" --model qwen3-30b-a3b --load-format dummy --device cuda --dtype bfloat16 --max-model-len 8192 --num-prompts 64 --input-len 256 --output-len 64
echo "== results"
cat "$OUT/bench_table.txt"
