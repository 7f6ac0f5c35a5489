#!/usr/bin/env bash
# Device call: tune the grouped GEMM's blocks for V2-Lite's and Qwen3-30B-A3B's expert shapes (bf16; the
# table comes back as $OUT/NVIDIA_H200.json), Qwen3's batch-1 step kernels, and the served TTFT probe.
# Usage (device): [SKIP_PROBES=1] [SHAPES='qwen3-30b-a3b:128'] bash scripts/issue13_tune.sh
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
T="$OUT/table.txt"; : > "$T"
cp moeserve/kernels/configs/NVIDIA_H200.json "$OUT/"
if [ -z "${SKIP_PROBES:-}" ]; then
timeout 120 python3 scripts/probes/first_requests.py deepseek-v2-lite > "$OUT/first_requests.txt" 2>&1
grep -E "^round" "$OUT/first_requests.txt" | cut -c1-400 >> "$T"
timeout 100 python3 scripts/probes/step_kernels.py qwen3-30b-a3b 1 > "$OUT/qwen3_b1_kernels.txt" 2>&1
head -1 "$OUT/qwen3_b1_kernels.txt" >> "$T"
fi
for spec in ${SHAPES:-deepseek-v2-lite:64 qwen3-30b-a3b:128}; do
  set -- ${spec%:*} ${spec#*:}
  timeout ${TUNE_TIMEOUT:-170} python3 -m moeserve bench moe --model $1 --local-experts $2 --tokens 1,8,32,128,512,4096 --dtype bf16 \
    --tune-output "$OUT/NVIDIA_H200.json" > "$OUT/tune_$1.log" 2>&1; echo "tune $1 rc $?" >> "$T"
  grep -vE "skipped|rejected" "$OUT/tune_$1.log" | tail -8 >> "$T"
done
echo "== results"; cat "$T"
