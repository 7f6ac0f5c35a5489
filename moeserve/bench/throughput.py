"""Offline throughput: N random prompts of a given length, each generating exactly `output_len`
tokens (ignore_eos), all submitted at once; the time from submission to the last token."""

import time
from dataclasses import dataclass

import torch

from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams


@dataclass
class ThroughputResult:
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    seconds: float

    def report(self) -> str:
        total = self.prompt_tokens + self.output_tokens
        return (f"{self.num_requests} requests in {self.seconds:.2f} s: {self.num_requests / self.seconds:.2f} requests/s, "
                f"{total / self.seconds:.1f} total tokens/s, {self.output_tokens / self.seconds:.1f} output tokens/s")


def run_throughput(llm: LLM, num_prompts: int, input_len: int, output_len: int, seed: int = 0) -> ThroughputResult:
    generator = torch.Generator().manual_seed(seed)
    vocab_size = llm.engine.config.vocab_size
    prompts = [{"prompt_token_ids": torch.randint(0, vocab_size, (input_len,), generator=generator).tolist()}
               for _ in range(num_prompts)]
    params = SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True, seed=seed)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return ThroughputResult(num_prompts, num_prompts * input_len, output_tokens, seconds)
