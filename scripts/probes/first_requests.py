"""Where the served TTFT goes: the engine at served defaults (warm-up on), one request, then 63 more as a
rate-inf client sends them, stepped by hand; each step's wall time and the Triton kernels compiled in it.
Usage: PYTHONPATH=. python3 scripts/probes/first_requests.py MODEL"""
import glob
import os
import sys
import time

from moeserve.bench.throughput import random_prompts, throughput_params
from moeserve.llm import LLM

CACHE = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))


def compiled() -> set[str]:
    return {p for p in glob.glob(f"{CACHE}/*/*.json") if not os.path.basename(p).startswith("__grp__")}


llm = LLM(sys.argv[1], load_format="dummy", dtype="bfloat16", device="cuda", max_model_len=8192,
          max_num_batched_tokens=8192)
engine = llm.engine
prompts = random_prompts(engine.config.vocab_size, 64, 256, 0)
params = throughput_params(64, 0)
for round_ in range(2):
    engine.add_request(prompts[0], params)
    added, step = 1, 0
    while engine.has_unfinished_requests():
        before, start = compiled(), time.perf_counter()
        engine.step()
        step += 1
        new = sorted({os.path.basename(p).removesuffix(".json") for p in compiled() - before})
        if step <= 6 or new:
            print(f"round {round_} step {step}: {(time.perf_counter() - start) * 1000:.1f} ms, compiled {new}", flush=True)
        for p in prompts[added:]:
            engine.add_request(p, params)
        added = len(prompts)
