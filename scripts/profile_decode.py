"""Where a decode step's time goes: torch.profiler over steady decode steps of one model on CUDA, printing
the step's wall time, GPU-busy share, kernels per step and the operators with the most host time.

  PYTHONPATH=TREE python scripts/profile_decode.py [--model deepseek-v2-lite] [--batch 1] [--steps 8]

Uses only the public API (LLM, SamplingParams), so it profiles any tree put on PYTHONPATH.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="deepseek-v2-lite")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", device=args.device, max_model_len=4096)
    engine = llm.engine
    params = SamplingParams(max_tokens=1000, ignore_eos=True, temperature=0)
    for b in range(args.batch):
        engine.add_request({"prompt_token_ids": list(range(100 + b, 356 + b))}, params)
    for _ in range(6):  # prefill, then warm decode steps
        engine.step()
    synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        synchronize()
    wall_ms = (time.perf_counter() - start) * 1000 / args.steps
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) / args.steps
    kernels = sum(e.count for e in events if e.self_device_time_total > 0 and e.self_cpu_time_total == 0) / args.steps
    print(f"{args.model} batch {args.batch}: {wall_ms:.1f} ms per decode step (profiled), GPU busy "
          f"{gpu_us / 1000:.1f} ms ({100 * gpu_us / 1000 / wall_ms:.0f}%), {kernels:.0f} kernels per step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48))


if __name__ == "__main__":
    main()
