#!/usr/bin/env bash
# bench serve against the server on V2-Lite's shape (random bf16), rate inf and 4, 64 prompts 256 in / 64 out.
# Needs the wheels of scripts/fetch_server_wheels.sh, carried as .whl. Usage (device): bash scripts/serve_gpu.sh
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
T="$OUT/serve_table.txt"; : > "$T"
python3 -m moeserve serve deepseek-v2-lite --load-format dummy --dtype bfloat16 --device cuda --max-model-len 8192 \
  --port 8000 > "$OUT/serve.log" 2>&1 &
for _ in $(seq 60); do
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')" 2>/dev/null && break; sleep 2
done
for rate in ${RATES:-inf 4}; do
  echo "== serve deepseek-v2-lite random bf16, request rate $rate" >> "$T"
  timeout 200 python3 -m moeserve bench serve --model deepseek-v2-lite --num-prompts 64 --input-len 256 \
    --output-len 64 --request-rate $rate --ignore-eos 2>&1 | tail -17 >> "$T"
done
kill %1
echo "== results"; cat "$T"
