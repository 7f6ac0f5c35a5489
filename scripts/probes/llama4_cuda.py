"""Which CUDA path makes tiny-llama4's greedy tokens differ from the CPU's: each variant against the CPU."""
import torch

from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams

PROMPTS = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 17, 40, 70)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
cpu = [o.outputs[0].token_ids for o in LLM("tiny-llama4", device="cpu").generate(PROMPTS, GREEDY)]
base = dict(device="cuda", max_num_batched_tokens=32, kv_cache_memory=2**26)
for extra in [{}, dict(enforce_eager=True), dict(attention_backend="torch"), dict(max_num_batched_tokens=512),
              dict(enforce_eager=True, attention_backend="torch", async_scheduling=False)]:
    try:
        got = [o.outputs[0].token_ids for o in LLM("tiny-llama4", **(base | extra)).generate(PROMPTS, GREEDY)]
        print("llama4", extra, [g == c for g, c in zip(got, cpu)], "first diff:",
              [next((i for i, (a, b) in enumerate(zip(g, c)) if a != b), None) for g, c in zip(got, cpu)], flush=True)
    except Exception as error:
        print("llama4", extra, "error", error)
    torch.cuda.empty_cache()
