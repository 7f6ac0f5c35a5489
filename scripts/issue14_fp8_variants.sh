#!/usr/bin/env bash
# V2-Lite FP8 batch-1 decode under the variants of scripts/probes/fp8_decode_variants.py (where the activations
# are quantized; dense decode blocks). Usage (device): bash scripts/issue14_fp8_variants.sh   (table last, logs under $OUT)
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
T="$OUT/table.txt"; : > "$T"
for variant in base dense-q1 moe-q1 both-q1 blocks; do
  echo "== $variant" >> "$T"
  timeout 90 python3 scripts/probes/fp8_decode_variants.py $variant 2>&1 | tee "$OUT/latency_$variant.log" \
    | grep -E "^\| moeserve|Error" | tail -2 >> "$T"
done
echo "== results"; cat "$T"
