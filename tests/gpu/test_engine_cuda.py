"""The engine on CUDA: the tiny models give the same greedy tokens as on the CPU (fp32)."""

import pytest
import torch

from moeserve.llm import LLM
from moeserve.loader import presets
from moeserve.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 17, 40, 70)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


@pytest.mark.parametrize("preset", sorted(presets.TINY_PRESETS))
def test_greedy_tokens_on_cuda_equal_cpu(preset):
    cpu = [o.outputs[0].token_ids for o in LLM(preset, device="cpu").generate(PROMPTS, GREEDY)]
    cuda_llm = LLM(preset, device="cuda", max_num_batched_tokens=32, kv_cache_memory=2**26)  # chunked prefill too
    cuda = [o.outputs[0].token_ids for o in cuda_llm.generate(PROMPTS, GREEDY)]
    assert cuda == cpu
    assert cuda_llm.engine.block_manager.num_free_blocks == cuda_llm.engine.block_manager.num_blocks
