#!/usr/bin/env bash
# Issue 15 on one GPU: the transport's CUDA tests (with the low-latency exchange under CUDA graphs) beside the
# no-compiles test, then on a quiet GPU `bench ep --virtual-ranks` (eager and graph-replay times beside a copy of the
# same bytes), the profile of each exchange (scripts/probes/ep_profile.py) and, for OVERLAP_POINTS, the puts beside a
# shared expert's GEMMs (scripts/probes/ep_overlap.py); with NVFP4_VARIANTS=R,... the NVFP4 kernels' variants;
# SKIP_BENCH=1 leaves the bench out; PROFILE_KNOBS="module.NAME=value ..." (values without spaces) profiles a second
# time with those set.
# Logs under $OUT; the table last.
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
T="$OUT/table.txt"; : > "$T"; rm -f "$OUT"/ep_profile*.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$T"  # (the device copy's .git is not this tree's)
for f in ${TEST_FILES:-tests/gpu/test_peer_to_peer_cuda.py tests/gpu/test_no_compiles_after_warm_up.py}; do
  ( timeout ${TEST_TIMEOUT:-240} python3 -m pytest "$f" -q -p no:cacheprovider -rfE > "$OUT/$(basename "$f" .py).log" 2>&1
    echo "$f rc=$? $(grep -E '[0-9]+ (passed|failed)' "$OUT/$(basename "$f" .py).log" | tail -1)" >> "$T" ) &
done
wait
grep -hE "^(FAILED|ERROR)" "$OUT"/test_*.log | head -8 >> "$T"
if [ -n "${NVFP4_VARIANTS:-}" ]; then  # R,...: the NVFP4 put and receive variants (scripts/probes/ep_nvfp4_variants.py)
  timeout ${VARIANTS_TIMEOUT:-150} python3 scripts/probes/ep_nvfp4_variants.py "$NVFP4_VARIANTS" 4096 ${VARIANTS_WHICH:-} > "$OUT/ep_nvfp4_variants.log" 2>&1
  { echo "nvfp4 variants rc=$?"; cat "$OUT/ep_nvfp4_variants.log" | tail -25; } >> "$T"
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  timeout ${BENCH_TIMEOUT:-200} python3 -m moeserve bench ep --virtual-ranks ${RANKS:-2,4,8} --tokens-per-rank 128,4096 \
    --iterations 10 > "$OUT/bench_ep_virtual.log" 2>&1
  echo "bench ep rc=$?" >> "$T"
fi
timeout ${PROFILE_TIMEOUT:-120} python3 scripts/probes/ep_profile.py ${PROFILE_POINTS:-2,8 128,4096 bf16,fp8,nvfp4 high-throughput} \
  > "$OUT/ep_profile.log" 2>&1
echo "profile rc=$?" >> "$T"
if [ -n "${PROFILE_KNOBS:-}" ]; then  # the same profile again with knobs set (scripts/probes/with_knobs.py)
  timeout ${PROFILE_TIMEOUT:-120} python3 scripts/probes/with_knobs.py $PROFILE_KNOBS -- scripts/probes/ep_profile.py \
    ${PROFILE_POINTS:-2,8 128,4096 bf16,fp8,nvfp4 high-throughput} > "$OUT/ep_profile_knobs.log" 2>&1
  echo "profile with $PROFILE_KNOBS rc=$?" >> "$T"
fi
for point in ${OVERLAP_POINTS:-}; do  # R,T,fmt: the puts beside a shared expert (scripts/probes/ep_overlap.py)
  timeout 120 python3 scripts/probes/ep_overlap.py ${point//,/ } > "$OUT/ep_overlap_${point//,/_}.log" 2>&1
  { echo "overlap $point rc=$?"; cat "$OUT/ep_overlap_${point//,/_}.log" | tail -7; } >> "$T"
done
for log in "$OUT"/ep_profile*.log; do
  echo "== $(basename "$log")" >> "$T"
  grep -E "^profile|^ +[0-9]" "$log" | awk '/^profile/{n=0} {if (n++ < 6) print}' | cut -c1-150 >> "$T"
done
[ -z "${SKIP_BENCH:-}" ] && grep -E "^\|" "$OUT/bench_ep_virtual.log" | cut -d'|' -f2-16 >> "$T"
cat "$T"
