#!/usr/bin/env bash
# NVFP4 rows read by the experts as they arrived, on one GPU: the GPU tests that cover it (in parallel), then on a
# quiet GPU `bench ep --virtual-ranks` for NVFP4 at 4096 tokens a rank, and the receive-then-experts against
# experts-on-NVFP4-rows probe (scripts/probes/nvfp4_activations_gemm.py). Logs under $OUT; the table last.
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
T="$OUT/table.txt"; : > "$T"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$T"
run_test() {  # file, -k expression
  timeout ${TEST_TIMEOUT:-200} python3 -m pytest "$1" -q -p no:cacheprovider -rfE -k "$2" > "$OUT/$(basename "$1" .py).log" 2>&1
  echo "$1 -k '$2' rc=$? $(grep -E '[0-9]+ (passed|failed)' "$OUT/$(basename "$1" .py).log" | tail -1)" >> "$T"
}
run_test tests/gpu/test_kernels_cuda.py "dispatched" &
run_test tests/gpu/test_ep_engine_one_gpu.py "${ENGINE_TESTS:-nvfp4 or decode-graphs}" &
[ -z "${SKIP_P2P_TESTS:-}" ] && run_test tests/gpu/test_peer_to_peer_cuda.py "nvfp4 or low_latency" &
wait
grep -hE "^(FAILED|ERROR)" "$OUT"/test_*.log | cut -c1-200 | head -8 >> "$T"
if [ -z "${SKIP_BENCH:-}" ]; then
  timeout ${BENCH_TIMEOUT:-120} python3 -m moeserve bench ep --virtual-ranks ${RANKS:-2,4,8} --tokens-per-rank 4096 \
    --format nvfp4 --iterations 10 > "$OUT/bench_ep_virtual.log" 2>&1
  echo "bench ep rc=$?" >> "$T"
fi
timeout ${PROBE_TIMEOUT:-120} python3 scripts/probes/nvfp4_activations_gemm.py ${PROBE_RANKS:-2 8} --rows ${ROWS:-256,8192} \
  > "$OUT/nvfp4_rows.log" 2>&1
echo "probe rc=$?" >> "$T"
tail -9 "$OUT/nvfp4_rows.log" >> "$T"
[ -z "${SKIP_BENCH:-}" ] && grep -E "^\|" "$OUT/bench_ep_virtual.log" | cut -d'|' -f2-16 >> "$T"
cat "$T"
