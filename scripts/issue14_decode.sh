#!/usr/bin/env bash
# Issue 14 on one GPU: the decode variants (the product transposed, 64-row decode blocks at 16+ rows per expert, NVFP4
# codes built as bf16 from their bits). The CUDA kernel and quantization tests, the MoE layer sweep (bf16 / FP8 / NVFP4,
# DeepSeek-V3, 32 local experts) with the card's copy and read yardsticks, V2-Lite batch 1 with bf16 / FP8 / NVFP4
# weights (the quantized ones with dense split-K summed by atomics, then in the kernel: MOESERVE_SPLIT_K), and the
# no-compiles-after-warm-up test. Logs under $OUT; the table last. TESTS, RUNS (weights:sum ...), SKIP_SWEEP=1 and
# SKIP_NO_COMPILES=1 narrow it; PROFILE=1 profiles each run's decode steps (GPU busy, kernels a step, top kernels;
# 110 s a run); BASELINE_TREE=DIR runs the same latency runs again from an older copy of the package there.
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
T="$OUT/table.txt"; : > "$T"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$T"
git log -1 --format=%h >> "$T" 2>/dev/null
timeout 330 python3 -m pytest ${TESTS:-tests/gpu/test_quant_cuda.py tests/gpu/test_kernels_cuda.py} -q -p no:cacheprovider -rf \
  > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?" >> "$T"; grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -8 >> "$T"
if [ -z "${SKIP_SWEEP:-}" ]; then
  timeout 120 python3 scripts/probes/swap_ab_sweep.py moe fp8,nvfp4 > "$OUT/sweep_moe.txt" 2>&1
  grep -v "^  " "$OUT/sweep_moe.txt" >> "$T"; echo "wrong variants: $(grep -c WRONG "$OUT/sweep_moe.txt")" >> "$T"
fi
for tree in . ${BASELINE_TREE:-}; do  # BASELINE_TREE: a folder with an older copy of the package (git archive REV
  # moeserve | tar -x -C DIR), run from inside it: `python3 -m` puts the working folder ahead of PYTHONPATH
for run in ${RUNS:-bf16:atomic fp8:atomic fp8:in-kernel nvfp4:atomic nvfp4:in-kernel}; do  # weights:dense split-K's sum
  q=${run%:*}; [ "$q" = bf16 ] && q=""
  tag=""; [ "$tree" != . ] && tag="_$(basename "$tree")"
  log="$OUT/latency_${run/:/_}$tag.log"  # one log a run: a run that prints nothing shows as nothing
  limit=${LATENCY_TIMEOUT:-55}; [ -n "${PROFILE:-}" ] && limit=${LATENCY_TIMEOUT:-110}
  ( cd "$tree" && MOESERVE_SPLIT_K=${run#*:} timeout $limit python3 -m moeserve bench latency --load-format dummy \
    --dtype bfloat16 --device cuda --max-model-len 4096 --model deepseek-v2-lite --batch-size 1 --input-len 256 \
    --output-len 64 --num-iters 2 --num-iters-warmup 1 ${q:+--quantization $q} ${PROFILE:+--profile} ) > "$log" 2>&1
  echo "== latency v2-lite b1 $run (tree $tree) rc=$? $(grep -E '^\| moeserve|Error' "$log" | tail -1)" >> "$T"
  [ -n "${PROFILE:-}" ] && grep -A6 "^profile" "$log" | cut -c1-150 >> "$T"
done
done
if [ -z "${SKIP_NO_COMPILES:-}" ]; then
  timeout 75 python3 -m pytest tests/gpu/test_no_compiles_after_warm_up.py -q -p no:cacheprovider -rf > "$OUT/no_compiles.log" 2>&1
  echo "no-compiles rc=$?" >> "$T"; grep -E "passed|failed|FAILED" "$OUT/no_compiles.log" | tail -4 >> "$T"
fi
cat "$T"
