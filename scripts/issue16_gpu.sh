#!/usr/bin/env bash
# Issue 16 on one GPU: EPLB's replica choice on CUDA, `moeserve plan` beside what started engines measure
# (V2-Lite and Qwen3-30B-A3B, random weights, bf16 and FP8), then the CUDA tests (sizing and graph capture
# changed). Logs under $OUT; the table last.
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 60 python3 -m pytest tests/gpu/test_eplb_cuda.py -q -p no:cacheprovider 2>&1 | tail -2
timeout ${PLAN_TIMEOUT:-240} python3 scripts/plan_vs_engine.py deepseek-v2-lite:bf16 deepseek-v2-lite:fp8 \
  qwen3-30b-a3b:bf16 qwen3-30b-a3b:fp8 > "$OUT/plan_vs_engine.log" 2>&1
echo "plan_vs_engine rc=$?"
timeout ${TESTS_TIMEOUT:-290} python3 -m pytest tests/gpu -q -p no:cacheprovider -rfEs --durations=15 > "$OUT/gpu_tests.log" 2>&1
echo "tests/gpu rc=$?"; tail -4 "$OUT/gpu_tests.log"
grep -E "FAILED|Error" "$OUT/gpu_tests.log" | head -20
grep -E "^\||FAILED|Error" "$OUT/plan_vs_engine.log" | tail -30
