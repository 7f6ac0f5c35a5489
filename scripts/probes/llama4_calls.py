"""tiny-llama4 on CUDA: every experts call computed both ways (fused kernels, reference); the calls that differ."""
import moeserve.layers.moe.experts as experts_module
from moeserve.kernels.fused_moe import fused_experts
from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams

PROMPTS = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 17, 40, 70)]
seen = []


def both(experts, x, layout):
    got, want = fused_experts(experts, x, layout), experts.reference(x, layout)
    diff = (got - want).abs().max().item() if x.shape[0] else 0.0
    seen.append(diff)
    if diff > 1e-4 and len(seen) < 400:
        print("llama4-call", len(seen), "rows", tuple(x.shape), x.stride(), x.dtype, "slots", tuple(layout.slots.shape),
              layout.slots.stride(), layout.slots.dtype, "weights", tuple(layout.weights.shape), layout.weights.stride(),
              layout.weights.dtype, "diff", diff, flush=True)
    return got


experts_module.moe_experts = both
llm = LLM("tiny-llama4", device="cuda", enforce_eager=True, attention_backend="torch", max_num_batched_tokens=512)
llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=4))
print("llama4-call total", len(seen), "max diff", max(seen))
