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
    prompts = random_prompts(llm.engine.config.vocab_size, num_prompts, input_len, seed)
    params = throughput_params(output_len, seed)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return ThroughputResult(num_prompts, prompt_tokens, output_tokens, seconds)


def throughput_params(output_len: int, seed: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True, seed=seed)


def run_hf_baseline(model: str, num_prompts: int, input_len: int, output_len: int, device: str, dtype: str,
                    seed: int = 0) -> ThroughputResult:
    """The same workload through transformers' generate, one batch of all prompts (no padding needed:
    they have equal lengths). Shape presets get transformers' own random weights."""
    hf_model = build_hf_model(model, device, dtype)
    vocab_size = hf_model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (num_prompts, input_len), generator=generator).to(device)
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=True, top_k=0,
                  attention_mask=torch.ones_like(ids))
    hf_model.generate(ids[:1, :8], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2, "attention_mask": None})
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        generated = hf_model.generate(ids, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    output_tokens = (generated.shape[1] - input_len) * num_prompts
    return ThroughputResult(num_prompts, num_prompts * input_len, output_tokens, seconds)


def random_prompts(vocab_size: int, num_prompts: int, input_len: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, vocab_size, (input_len,), generator=generator).tolist()}
            for _ in range(num_prompts)]


def build_hf_model(model: str, device: str, dtype: str):
    """The model as transformers builds it, in eval mode: a checkpoint folder or tiny preset with its
    weights, a shape preset with transformers' own random weights."""
    import transformers

    from moeserve.loader.resolve import resolve_checkpoint
    from moeserve.loader.presets import SHAPE_PRESETS

    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        if model in SHAPE_PRESETS:
            config = transformers.AutoConfig.for_model(**hf_config_fields(SHAPE_PRESETS[model]))
            hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        else:
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(resolve_checkpoint(model), dtype=torch_dtype)
    return hf_model.eval()


def hf_config_fields(preset: dict) -> dict:
    """A shape preset as the keyword arguments of transformers.AutoConfig.for_model."""
    return {k: v for k, v in preset.items() if k not in ("architectures", "torch_dtype")}
