#!/usr/bin/env bash
# Issue 17 on a machine of N GPUs (nvidia-h200-x2/-x4/-x8 or the H100 kinds): the runs, by stage, each inside one call
# of 10 minutes. Logs under $OUT, the table last. Not yet run: no machine of several GPUs has been lent so far.
#   STAGE=tests  tests/gpu (the distributed tests over NCCL and p2p, then every other file, as in one-GPU sessions)
#   STAGE=ep     bench ep at DeepSeek-V3 shapes, 128 and 4096 tokens a rank, bf16/FP8/NVFP4, every backend and mode,
#                beside NCCL all_to_all_single of the same bytes
#   STAGE=ep-sms the p2p backends with their puts and gets on an SM budget (bench ep --comm-sms, the engine's
#                --ep-comm-sms): how many SMs fill the
#                fabric, bf16 and FP8, 128 and 4096 tokens a rank
#   STAGE=e2e    bench throughput / latency of V2-Lite and Qwen3-30B-A3B (random bf16): --dp N --ep N against one GPU
#   STAGE=v3     DeepSeek-V3's shape with random FP8 weights on every GPU: plan, throughput at 128 prompts a rank,
#                batch-1 latency (bench serve needs the server wheels: scripts/serve_gpu.sh shows how)
set -u
OUT=${OUT:-/tmp/moeserve-out}; mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOESERVE_CACHE_DIR=/tmp/moeserve-cache
N=$(nvidia-smi --list-gpus | wc -l)
T="$OUT/table.txt"; : > "$T"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c >> "$T"
echo "stage ${STAGE:-tests} on $N GPUs" >> "$T"

throughput() {  # label, then arguments of moeserve bench throughput
  local label=$1; shift
  echo "== $label" >> "$OUT/e2e.log"
  timeout ${RUN_TIMEOUT:-200} python3 -m moeserve bench throughput "$@" >> "$OUT/e2e.log" 2>&1
  echo "$label rc=$? $(grep -E 'moeserve:' "$OUT/e2e.log" | tail -1)" >> "$T"
}

case ${STAGE:-tests} in
tests)
  timeout 330 python3 -m pytest tests/gpu/test_distributed_cuda.py -q -p no:cacheprovider -rfE > "$OUT/distributed.log" 2>&1
  echo "distributed rc=$? $(tail -1 "$OUT/distributed.log")" >> "$T"
  grep -E "^(FAILED|ERROR)" "$OUT/distributed.log" | head -12 >> "$T"
  timeout 240 python3 -m pytest tests/gpu -q -p no:cacheprovider -rfE --deselect tests/gpu/test_distributed_cuda.py \
    > "$OUT/one_gpu_files.log" 2>&1
  echo "other tests/gpu rc=$? $(tail -1 "$OUT/one_gpu_files.log")" >> "$T"
  ;;
ep)
  timeout 540 python3 -m moeserve bench ep --ranks "$N" --tokens-per-rank 128,4096 --format bf16,fp8,nvfp4 \
    --backend all_to_all,allgather,p2p,p2p-ll --iterations 20 > "$OUT/bench_ep.log" 2>&1
  echo "bench ep rc=$?" >> "$T"; grep -E "^\|" "$OUT/bench_ep.log" >> "$T"
  ;;
ep-sms)
  timeout 540 python3 -m moeserve bench ep --ranks "$N" --tokens-per-rank 128,4096 --format bf16,fp8 \
    --backend p2p,p2p-ll --comm-sms none,8,16,32,64 --iterations 20 > "$OUT/bench_ep_sms.log" 2>&1
  echo "bench ep (SM budgets) rc=$?" >> "$T"; grep -E "^\|" "$OUT/bench_ep_sms.log" >> "$T"
  ;;
e2e)
  common="--load-format dummy --dtype bfloat16 --device cuda --max-model-len 4096 --input-len 256 --output-len 64"
  for model in deepseek-v2-lite qwen3-30b-a3b; do
    throughput "$model 1 GPU, 128 prompts" --model $model $common --num-prompts 128
    throughput "$model dp=ep=$N, $((128 * N)) prompts" --model $model $common --num-prompts $((128 * N)) --dp $N --ep $N
    throughput "$model dp=ep=$N NCCL, $((128 * N)) prompts" --model $model $common --num-prompts $((128 * N)) \
      --dp $N --ep $N --ep-backend all_to_all
  done
  timeout 200 python3 -m moeserve bench latency --model deepseek-v2-lite $common --batch-size 1 --num-iters 3 \
    --num-iters-warmup 1 --dp $N --ep $N >> "$OUT/e2e.log" 2>&1
  echo "v2-lite latency b1 dp=ep=$N rc=$? $(grep -E '^\| moeserve' "$OUT/e2e.log" | tail -1)" >> "$T"
  ;;
v3)
  python3 -m moeserve plan --model deepseek-v3 --quantization fp8 --dp $N --ep $N --gpu H200 > "$OUT/plan.log" 2>&1
  echo "plan rc=$?" >> "$T"; tail -14 "$OUT/plan.log" >> "$T"
  common="--model deepseek-v3 --load-format dummy --quantization fp8 --device cuda --max-model-len 4096 --dp $N --ep $N"
  RUN_TIMEOUT=420 throughput "deepseek-v3 fp8 dp=ep=$N, $((128 * N)) prompts" $common --num-prompts $((128 * N)) \
    --input-len 1024 --output-len 256
  ;;
esac
cat "$T"
