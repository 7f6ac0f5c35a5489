"""The kernels of one steady decode step in launch order, with durations: MODEL BATCH (V2-Lite shape, random
bf16, or QUANTIZATION fp8 / nvfp4 on load; 256-token prompts).
Usage: PYTHONPATH=. python3 scripts/probes/step_kernels.py deepseek-v2-lite 1 [fp8] > FILE"""
import sys

from moeserve.bench.latency import latency_params
from moeserve.bench.profile import profile_engine
from moeserve.bench.throughput import random_prompts
from moeserve.llm import LLM

model, batch = sys.argv[1], int(sys.argv[2])
quantization = sys.argv[3] if len(sys.argv) > 3 else None
llm = LLM(model, load_format="dummy", dtype="bfloat16", device="cuda", max_model_len=4096, quantization=quantization)
prompts = random_prompts(llm.engine.config.vocab_size, batch, 256, 0)
profile = profile_engine(llm.engine, prompts, latency_params(64, 1.0), 1, 4)
print(f"{len(profile.activities)} kernels, busy {profile.busy_ms_per_step:.3f} ms")
for a in sorted(profile.activities, key=lambda a: a.start_us):
    print(f"{a.duration_us:7.1f}  {a.name[:110]}")
