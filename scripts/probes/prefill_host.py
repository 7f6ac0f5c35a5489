"""Host time of prefill steps: cProfile over the prefill of a batch (after a warm-up batch), the Python
functions with the most own and total time. Usage: PYTHONPATH=. python3 scripts/probes/prefill_host.py"""
import cProfile
import io
import pstats
import sys
import time

import torch

from moeserve.bench.latency import latency_params
from moeserve.bench.throughput import random_prompts
from moeserve.llm import LLM

model = sys.argv[1] if len(sys.argv) > 1 else "deepseek-v2-lite"
chunk = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
llm = LLM(model, load_format="dummy", dtype="bfloat16", device="cuda", max_model_len=4096, max_num_batched_tokens=chunk)
engine = llm.engine
params = latency_params(8, 1.0)


def prefill(seed: int) -> int:
    ids = [engine.add_request(p, params) for p in random_prompts(engine.config.vocab_size, 128, 512, seed)]
    started, steps = set(), 0
    while len(started) < len(ids):
        outputs = engine.step()
        steps += 1
        started |= {o.request_id for o in outputs if o.outputs[0].token_ids}
    torch.cuda.synchronize()
    for i in ids:
        engine.abort(i)
    while engine.has_unfinished_requests():
        engine.step()
    return steps


prefill(1)
start = time.perf_counter()
profiler = cProfile.Profile()
profiler.enable()
steps = prefill(2)
profiler.disable()
print(f"prefill of 128 x 512 in {steps} steps: {time.perf_counter() - start:.3f} s under cProfile")
for key in ("tottime", "cumulative"):
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(35)
    print("\n".join(line[:160] for line in text.getvalue().splitlines()[6:50]))
