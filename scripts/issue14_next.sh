#!/usr/bin/env bash
# The next device calls for issue 14 (none of this has run on a GPU yet): PART=tests — the CUDA tests of
# the in-GEMM FP8 activation quantization (exact divisions, NaN), the dense kernel, MLA's kv_b path, and
# no compiles after the warm-up on bf16 / FP8 / NVFP4 models; PART=bench — the dense kernel against
# dequantize + cuBLAS and bf16 cuBLAS, the dense-config sweep, V2-Lite batch 1 and 128 with FP8 weights
# against bf16. Usage (device): PART=tests|bench bash scripts/issue14_next.sh   (table last, logs under $OUT)
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
T="$OUT/table.txt"; : > "$T"
if [ "${PART:-tests}" = tests ]; then
  timeout 300 python3 -m pytest tests/gpu/test_quant_cuda.py tests/gpu/test_kernels_cuda.py tests/gpu/test_engine_cuda.py \
    tests/gpu/test_attention_cuda.py tests/gpu/test_cuda_graphs.py -q -p no:cacheprovider -rf 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -8 >> "$T"
  timeout 280 python3 -m pytest tests/gpu/test_no_compiles_after_warm_up.py -q -p no:cacheprovider -rf 2>&1 \
    | tee "$OUT/no_compiles.log" | tail -6 >> "$T"
else
  timeout 100 python3 scripts/probes/quant_linear_bench.py > "$OUT/quant_linear_bench.txt" 2>&1
  cat "$OUT/quant_linear_bench.txt" >> "$T"
  timeout 150 python3 scripts/probes/quant_linear_sweep.py > "$OUT/quant_linear_sweep.txt" 2>&1
  cat "$OUT/quant_linear_sweep.txt" >> "$T"
  for batch in 1 128; do
    for q in fp8 ""; do
      echo "== latency v2-lite b$batch ${q:-bf16}" >> "$T"
      timeout 100 python3 -m moeserve bench latency --load-format dummy --dtype bfloat16 --device cuda \
        --max-model-len 4096 --model deepseek-v2-lite --batch-size $batch --input-len 256 --output-len 64 \
        --num-iters 2 --num-iters-warmup 1 ${q:+--quantization $q} 2>&1 | tee -a "$OUT/latency.log" \
        | grep -E "^\| moeserve|Error|error" | tail -3 >> "$T"
    done
  done
fi
echo "== results"; cat "$T"
