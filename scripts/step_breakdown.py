"""Where a steady decode step's wall time goes, on CUDA: engine.step() against the graph replay alone and the
sampler alone, and the top kernels of the replay (moeserve.bench.profile). For whole decode steps, GPU busy and
their kernels, `moeserve bench latency --profile`.

  PYTHONPATH=. python3 scripts/step_breakdown.py [--model deepseek-v2-lite] [--batch 1]
"""

import argparse
import time

import torch

from moeserve.bench.profile import profile_steps
from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams


def timed(fn, iters: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / iters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="deepseek-v2-lite")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=256, help="prompt tokens per sequence")
    args = parser.parse_args()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", device="cuda", max_model_len=4096,
              max_num_batched_tokens=8192)
    engine, runner = llm.engine, llm.engine.runner
    for b in range(args.batch):
        engine.add_request({"prompt_token_ids": [(100 + b + i) % 50000 for i in range(args.context)]},
                           SamplingParams(max_tokens=1000, ignore_eos=True, temperature=0))
    while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in engine.scheduler.running) or \
            engine.scheduler.waiting:  # through the prefills, then two decode steps
        engine.step()
    engine.step(), engine.step()
    step_ms = timed(engine.step, 20)
    size = runner.graphs.size_for(args.batch)
    replay_ms = timed(lambda: runner.graphs.replay(size), 20)
    logits = runner.graphs.replay(size)[: args.batch]
    seqs = list(engine.scheduler.running)
    sampler_ms = timed(lambda: runner.sampler(logits, seqs, runner.eos_token_ids), 20)
    scheduled = engine.scheduler.schedule()
    send_ms = timed(lambda: runner.send(sorted(scheduled, key=lambda s: s[1] != 1), pad_to=size), 20)
    replay = profile_steps(lambda: runner.graphs.replay(size), 1, torch.device("cuda"))
    print(f"{args.model} batch {args.batch} (graph {size}): step {step_ms:.2f} ms | replay {replay_ms:.2f} ms | "
          f"sampler {sampler_ms:.2f} ms | send {send_ms:.3f} ms")
    print(replay.report("graph replay"))

if __name__ == "__main__":
    main()
