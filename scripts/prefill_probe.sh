#!/usr/bin/env bash
# Where prefill time goes: bench latency of V2-Lite at batch 128 x 512 in with the prefill profile, at
# the default chunk (max_num_batched_tokens) and larger ones. Usage (device): bash scripts/prefill_probe.sh
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
T="$OUT/table.txt"; : > "$T"
for chunk in ${CHUNKS:-2048 8192 16384}; do
  echo "== prefill V2-Lite b128 x 512, max_num_batched_tokens $chunk" >> "$T"
  timeout ${SECONDS_EACH:-150} python3 -m moeserve bench latency --load-format dummy --dtype bfloat16 --device cuda \
    --max-model-len 4096 --model deepseek-v2-lite --batch-size 128 --input-len 512 --output-len 8 --num-iters 1 \
    --num-iters-warmup 1 --max-num-batched-tokens $chunk --profile --profile-steps 4 \
    --output-json "$OUT/prefill_$chunk.json" > "$OUT/prefill_$chunk.log" 2>&1
  grep -A18 "prefill steps" "$OUT/prefill_$chunk.log" >> "$T"; grep "^| moeserve" "$OUT/prefill_$chunk.log" >> "$T"
  tail -3 "$OUT/prefill_$chunk.log" | grep -i error >> "$T"
done
echo "== results"; cat "$T"
