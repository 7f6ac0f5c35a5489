"""Where an offline run's time goes, step by step: the bench throughput workload stepped by hand, each
step's wall time and how many requests had their first token by then. Usage: offline_steps.py MODEL N IN OUT"""
import sys
import time

import torch

from moeserve.bench.throughput import random_prompts, throughput_params
from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams

model, num, input_len, output_len = sys.argv[1], *map(int, sys.argv[2:5])
llm = LLM(model, load_format="dummy", dtype="bfloat16", device="cuda", max_model_len=4096)
engine = llm.engine
prompts = random_prompts(engine.config.vocab_size, num, input_len, 0)
llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))
params = throughput_params(output_len, 0)
start = time.perf_counter()
for p in prompts:
    engine.add_request(p, params)
times, started = [], set()
while engine.has_unfinished_requests():
    t = time.perf_counter()
    outputs = engine.step()
    times.append((time.perf_counter() - t) * 1000)
    started |= {o.request_id for o in outputs if o.outputs[0].token_ids}
    if len(times) <= 6:
        print(f"step {len(times)}: {times[-1]:.1f} ms, {len(started)} started", flush=True)
torch.cuda.synchronize()
total = time.perf_counter() - start
print(f"{model}: {len(times)} steps, {total:.3f} s ({num * output_len / total:.1f} output tok/s); "
      f"steps sum {sum(times):.1f} ms; first 3 {sum(times[:3]):.1f} ms; the rest median "
      f"{sorted(times[3:])[len(times[3:]) // 2]:.2f} ms, max {max(times[3:]):.1f} ms")
