#!/usr/bin/env bash
# With the experts quantizing first and FP8 dense decode blocks 128 wide: the quantization and kernel CUDA tests,
# then V2-Lite latency FP8 b1 / b128 and NVFP4 b1. Usage (device): bash scripts/issue14_adopted.sh
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
T="$OUT/table.txt"; : > "$T"
timeout 130 python3 -m pytest tests/gpu/test_quant_cuda.py "tests/gpu/test_kernels_cuda.py::test_fused_experts_at_deepseek_widths" -q -p no:cacheprovider -rf -x 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -3 >> "$T"
for run in "fp8 1" "nvfp4 1" "fp8 128"; do
  echo "== v2-lite $run" >> "$T"
  timeout 60 python3 scripts/probes/fp8_decode_variants.py base $run 2>&1 | tee -a "$OUT/latency.log" \
    | grep -E "^\| moeserve|Error" | tail -2 >> "$T"
done
echo "== results"; cat "$T"
