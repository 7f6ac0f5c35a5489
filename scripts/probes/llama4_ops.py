"""tiny-llama4 on CUDA (eager, torch attention) with one CUDA op family swapped for its torch reference at a
time: which one makes the greedy tokens differ from the CPU's."""
import sys

import torch

import moeserve.layers.mlp
import moeserve.layers.moe.experts
import moeserve.layers.norm
from moeserve.layers.rotary import RotaryEmbedding
from moeserve.llm import LLM
from moeserve.ops import norm as ops_norm
from moeserve.sampling_params import SamplingParams

PROMPTS = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 17, 40, 70)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
cpu = [o.outputs[0].token_ids for o in LLM("tiny-llama4", device="cpu").generate(PROMPTS, GREEDY)]


def run(label, patch=lambda llm: None):
    llm = LLM("tiny-llama4", device="cuda", enforce_eager=True, attention_backend="torch", max_num_batched_tokens=512)
    patch(llm)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    print("llama4-ops", label, [g == c for g, c in zip(got, cpu)], flush=True)


def no_rope_table(llm):
    for m in llm.engine.runner.model.modules():
        if isinstance(m, RotaryEmbedding):
            m.table = None


run("all cuda ops")
run("rope reference", no_rope_table)
moeserve.layers.moe.experts.moe_experts = lambda experts, x, layout, out=None: (
    experts.reference(x, layout) if out is None else out.copy_(experts.reference(x, layout)))
run("+ experts reference", no_rope_table)
moeserve.layers.norm.rms_norm = lambda x, w, eps: ops_norm.rms_norm_reference(x, w, eps)
moeserve.layers.norm.add_rms_norm = lambda x, r, w, eps: ops_norm.add_rms_norm_reference(x, r, w, eps)
run("+ norms reference", no_rope_table)
moeserve.layers.mlp.silu_and_mul = lambda gu: torch.nn.functional.silu(gu.chunk(2, -1)[0]) * gu.chunk(2, -1)[1]
run("+ silu reference", no_rope_table)
