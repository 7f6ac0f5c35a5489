"""The engine's greedy outputs equal transformers' generate, for every family and batching regime."""

import functools

import pytest
import torch
import transformers

from moeserve.engine.kv_cache import bytes_per_block
from moeserve.llm import LLM
from moeserve.loader import presets
from moeserve.loader.model_loader import load_config
from moeserve.loader.resolve import resolve_checkpoint
from moeserve.sampling_params import SamplingParams

MAX_TOKENS = 12
PROMPT_LENGTHS = (3, 17, 9, 30, 60)  # 60 + 12 crosses tiny-llama4's 64-token attention chunk


def prompts(vocab_size: int, num_prompts: int = len(PROMPT_LENGTHS)) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS[:num_prompts]]


@functools.cache
def reference_outputs(preset: str) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(resolve_checkpoint(preset), attn_implementation="eager")
    if hasattr(model, "set_experts_implementation") and "llama4" not in preset:
        model.set_experts_implementation("eager")
    outputs = []
    for prompt in prompts(model.config.vocab_size):
        ids = torch.tensor([prompt])
        generated = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, attention_mask=torch.ones_like(ids))
        outputs.append(generated[0, len(prompt):].tolist())
    return outputs


def engine_outputs(llm: LLM, one_at_a_time: bool = False, num_prompts: int = len(PROMPT_LENGTHS)) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    token_prompts = [{"prompt_token_ids": p} for p in prompts(llm.engine.config.vocab_size, num_prompts)]
    if one_at_a_time:
        return [llm.generate(p, params)[0].outputs[0].token_ids for p in token_prompts]
    return [o.outputs[0].token_ids for o in llm.generate(token_prompts, params)]


def truncated_at_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize("preset", sorted(presets.TINY_PRESETS))
def test_batched_and_sequential_greedy_equal_transformers(preset):
    llm = LLM(preset)
    expected = [truncated_at_eos(o, llm.engine.eos_token_ids) for o in reference_outputs(preset)]
    assert engine_outputs(llm) == expected
    assert engine_outputs(llm, one_at_a_time=True) == expected
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize("preset", ["tiny-deepseek-v3", "tiny-llama4", "tiny-qwen2-moe"])
def test_tiny_budget_and_preemption_keep_greedy_outputs(preset):
    block_size, num_blocks = 4, 12  # 48 tokens for 4 requests that need 15 to 42 each
    kv_bytes = bytes_per_block(load_config(preset), block_size, torch.float32) * num_blocks
    llm = LLM(preset, max_num_batched_tokens=5, block_size=block_size, kv_cache_memory=kv_bytes, max_model_len=44)
    expected = [truncated_at_eos(o, llm.engine.eos_token_ids) for o in reference_outputs(preset)[:4]]
    assert engine_outputs(llm, num_prompts=4) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == num_blocks
