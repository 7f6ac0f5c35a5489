#!/usr/bin/env bash
# Device calls. Stage "tests": the CUDA tests and the CPU suite on this node's package versions.
# Stage "bench": throughput of the tiny model (CPU, CUDA) and DeepSeek-V2-Lite's real shape with random
# weights (bf16, CUDA), each beside transformers' generate on the same workload. Stage "qwen3":
# Qwen3-30B-A3B's shape the same way. Stage "quant": V2-Lite's shape quantized on load (fp8, nvfp4).
# Stage "ep" (2 or more GPUs): bench ep at DeepSeek-V3 shapes on NCCL.
# Stage "tune": the block-size sweep, updating this tree's moeserve/kernels/configs/<card>.json (so "tune
# moe" uses it); the table comes back as $OUT/kernel_configs.json, to be copied there in the repo.
# Stage "moe": moeserve bench moe at DeepSeek-V3 shapes.
# Stage "serve" (needs the wheels of scripts/fetch_server_wheels.sh, carried as .whl): the server on
# DeepSeek-V2-Lite's real shape with random weights, measured with moeserve bench serve.
# Stage "attention": moeserve bench attention (MLA and GQA decode and prefill kernels, beside the card's read
# bandwidth and SDPA flash). Stage "e2e": DeepSeek-V2-Lite's shape (random bf16) at batch 1 and 128, with the
# tree in .before/ (an earlier commit's moeserve/, carried) and this one, in the same call.
# Stage "latency": moeserve bench latency --profile at the issue-13 target points (V2-Lite, Qwen3-30B-A3B).
# Usage: bash scripts/gpu_engine_check.sh tests|bench|qwen3|quant|ep|moe|tune|serve|attention|e2e|latency [more stages]
set -u
STAGES=${*:-tests}
has() { [[ " $STAGES " == *" $1 "* ]]; }
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
: > "$OUT/bench_table.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/bench_table.txt"
python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/bench_table.txt"

bench() {  # label, then arguments of moeserve bench throughput
  local label=$1; shift
  echo "== $label: moeserve bench throughput $*" >> "$OUT/bench.log"
  timeout 280 python3 -m moeserve bench throughput "$@" >> "$OUT/bench.log" 2>&1
  echo "$label | $(grep -A100 "== $label:" "$OUT/bench.log" | grep -E "KV cache \(|requests in" | sed 's/.*engine: //' | tr '\n' ' ')" >> "$OUT/bench_table.txt"
}
if has tests; then
  timeout 420 python3 -m pytest tests/gpu -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
fi
if has cpu; then
  # the CPU suite, on this node's package versions (CUDA hidden: these tests expect the CPU)
  CUDA_VISIBLE_DEVICES= python3 -m pytest tests -q -p no:cacheprovider --ignore=tests/gpu 2>&1 | tee "$OUT/cpu_suite_on_gpu_node.log" | tail -4
fi
if has bench; then
  bench "tiny-deepseek-v3 cpu fp32" --model tiny-deepseek-v3 --device cpu --num-prompts 64 --input-len 128 --output-len 64 --compare-hf
  bench "tiny-deepseek-v3 cuda fp32" --model tiny-deepseek-v3 --device cuda --num-prompts 64 --input-len 128 --output-len 64 --compare-hf
  bench "deepseek-v2-lite dummy cuda bf16" --model deepseek-v2-lite --load-format dummy --device cuda --dtype bfloat16 --max-model-len 8192 --num-prompts 64 --input-len 256 --output-len 64 --compare-hf
fi
if has qwen3; then
  bench "qwen3-30b-a3b dummy cuda bf16" --model qwen3-30b-a3b --load-format dummy --device cuda --dtype bfloat16 --max-model-len 8192 --num-prompts 64 --input-len 256 --output-len 64 --compare-hf
fi
if has quant; then
  for fmt in fp8 nvfp4; do
    bench "deepseek-v2-lite dummy cuda $fmt" --model deepseek-v2-lite --load-format dummy --device cuda --dtype bfloat16 --quantization $fmt --max-model-len 8192 --num-prompts 32 --input-len 256 --output-len 32
  done
fi
if has ep; then
  GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
  timeout 500 python3 -m moeserve bench ep --ranks "$GPUS" --tokens-per-rank 128,4096 --hidden 7168 --topk 8 \
    --experts 256 2>&1 | tee "$OUT/bench_ep.log" | grep -E "^\||^EP" >> "$OUT/bench_table.txt"
fi
if has tune; then
  card=$(python3 -c "import torch; from moeserve.kernels.tuning import card_file; print(card_file(torch.cuda.get_device_name()))")
  mkdir -p "$(dirname "$card")"
  timeout ${TUNE_SECONDS:-300} python3 -m moeserve bench moe --model deepseek-v3 --local-experts 32 --tokens 1,32,512,8192 \
    --dtype ${TUNE_DTYPES:-bf16,fp8,nvfp4} --tune-output "$card" 2>&1 | tee "$OUT/tune.log" | grep -E "^\|" >> "$OUT/bench_table.txt"
  cp "$card" "$OUT/kernel_configs.json"
fi
if has moe; then
  timeout ${MOE_SECONDS:-400} python3 -m moeserve bench moe --model deepseek-v3 --local-experts ${MOE_EXPERTS:-32,256} ${MOE_ARGS:-} 2>&1 | tee "$OUT/bench_moe.log" \
    | grep -E "^\|" >> "$OUT/bench_table.txt"
fi
if has attention; then
  timeout ${ATTENTION_SECONDS:-300} python3 -m moeserve bench attention ${ATTENTION_ARGS:-} 2>&1 \
    | tee "$OUT/bench_attention.log" | grep -E "^\||read bandwidth" >> "$OUT/bench_table.txt"
fi
if has e2e; then
  for tree in .before .; do
    for point in "1 128" "128 64"; do
      set -- $point
      echo "== $tree: V2-Lite random bf16, $1 prompts, 256 in / $2 out" >> "$OUT/bench_table.txt"
      (cd $tree && PYTHONPATH=. timeout 200 python3 -m moeserve bench throughput --model deepseek-v2-lite \
        --load-format dummy --dtype bfloat16 --device cuda --max-model-len 4096 --num-prompts $1 --input-len 256 \
        --output-len $2 2>&1) | tee -a "$OUT/e2e.log" | grep -E "KV cache|moeserve:" >> "$OUT/bench_table.txt"
    done
  done
fi
if has serve; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
  python3 -m moeserve serve deepseek-v2-lite --load-format dummy --dtype bfloat16 --device cuda --max-model-len 8192 \
    --port 8000 > "$OUT/serve.log" 2>&1 &
  for _ in $(seq 120); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')" 2>/dev/null && break; sleep 2
  done
  for rate in inf 4; do
    echo "== serve deepseek-v2-lite random bf16, request rate $rate" >> "$OUT/bench_table.txt"
    timeout 240 python3 -m moeserve bench serve --model deepseek-v2-lite --num-prompts 64 --input-len 256 \
      --output-len 64 --request-rate $rate --ignore-eos 2>&1 | tail -17 >> "$OUT/bench_table.txt"
  done
  kill %1
fi
if has latency; then
  # the issue-13 targets: V2-Lite and Qwen3-30B-A3B shapes (random bf16) at batch 1 (with the transformers
  # yardstick) and steady decode at a large batch, each with its profile
  for point in "deepseek-v2-lite 1 256 --compare-hf" "deepseek-v2-lite 128 512" "qwen3-30b-a3b 1 256 --compare-hf" \
               "qwen3-30b-a3b 64 512"; do
    set -- $point
    echo "== latency $1 batch $2, $3 in / 128 out" >> "$OUT/bench_table.txt"
    timeout 420 python3 -m moeserve bench latency --model $1 --load-format dummy --dtype bfloat16 --device cuda \
      --max-model-len 4096 --batch-size $2 --input-len $3 --output-len 128 --num-iters 3 --num-iters-warmup 1 \
      --profile ${4:-} --output-json "$OUT/latency_$1_b$2.json" 2>&1 | tee -a "$OUT/latency.log" \
      | grep -E "^\| (moeserve|transformers)|^profile of|^busy time|cannot build" >> "$OUT/bench_table.txt"
  done
fi
echo "== results"
cat "$OUT/bench_table.txt"
if has graphs; then
  # CUDA-graph decode against eager on every tiny family, then V2-Lite's shape at batch 1 and 128 with and
  # without graphs (and the tree in .before/ when carried)
  timeout 400 python3 -m pytest tests/gpu/test_cuda_graphs.py tests/gpu/test_engine_cuda.py -q -p no:cacheprovider -x \
    2>&1 | tee "$OUT/gpu_graph_tests.log" | tail -6 | tee -a "$OUT/bench_table.txt"
  for mode in "" "--enforce-eager"; do
    for point in "1 128" "128 64"; do
      set -- $point
      echo "== graphs ${mode:-on}: V2-Lite random bf16, $1 prompts, 256 in / $2 out" >> "$OUT/bench_table.txt"
      timeout 200 python3 -m moeserve bench throughput --model deepseek-v2-lite --load-format dummy --dtype bfloat16 \
        --device cuda --max-model-len 4096 --num-prompts $1 --input-len 256 --output-len $2 $mode 2>&1 \
        | tee -a "$OUT/graphs_e2e.log" | grep -E "KV cache \(|Captured|moeserve:" >> "$OUT/bench_table.txt"
    done
  done
fi
