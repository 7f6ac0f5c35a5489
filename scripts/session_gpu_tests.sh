#!/usr/bin/env bash
# Every tests/gpu file as its own pytest process, all at once (correctness only: they share the GPU and the CPUs
# compile Triton kernels in parallel), then the virtual-rank EP transport bench on a quiet GPU. Logs under $OUT, the
# Triton cache packed into $OUT so the next call can carry it (TRITON_CACHE_DIR=.triton-cache). The table last.
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT/logs"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}; mkdir -p "$TRITON_CACHE_DIR"
T="$OUT/table.txt"; : > "$T"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$T"
TEST_TIMEOUT=${TEST_TIMEOUT:-360}
for f in ${TEST_FILES:-tests/gpu/test_*.py}; do
  name=$(basename "$f" .py)
  ( timeout "$TEST_TIMEOUT" python3 -m pytest "$f" -q -p no:cacheprovider -rfE${PYTEST_EXTRA:+ $PYTEST_EXTRA} \
      > "$OUT/logs/$name.log" 2>&1; echo "$?" > "$OUT/logs/$name.rc" ) &
done
wait
for f in ${TEST_FILES:-tests/gpu/test_*.py}; do
  name=$(basename "$f" .py)
  printf '%-36s rc=%s %s\n' "$name" "$(cat "$OUT/logs/$name.rc")" \
    "$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$OUT/logs/$name.log" | tail -1)" >> "$T"
  grep -E '^(FAILED|ERROR)' "$OUT/logs/$name.log" | head -5 >> "$T"
done
if [ -n "${EP_BENCH:-1}" ]; then
  timeout ${EP_TIMEOUT:-150} python3 -m moeserve bench ep --virtual-ranks 2,4,8 --tokens-per-rank 128,4096 \
    --iterations 10 > "$OUT/logs/bench_ep_virtual.log" 2>&1
  echo "bench ep rc=$?" >> "$T"; tail -40 "$OUT/logs/bench_ep_virtual.log" >> "$T"
fi
tar -C "$OUT" -czf "$OUT/gpu_logs.tgz" logs && rm -rf "$OUT/logs"
tar -C "$(dirname "$TRITON_CACHE_DIR")" -czf "$OUT/triton_cache.tgz" "$(basename "$TRITON_CACHE_DIR")"
ls -la "$OUT" >> "$T"
cat "$T"
