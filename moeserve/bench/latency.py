"""Latency of one batch, the shape of vLLM's `bench latency`: batch_size random prompts of input_len tokens,
each generating exactly output_len tokens (ignore_eos), stepped through the engine one step at a time, each
step timed from one return of engine.step() to the next. Every step waits for its sampled ids, so the times
follow the device; no extra synchronize, which would keep async scheduling from launching the next step
while the host finishes the last. The prefill is the steps until every request has its first token; the
steady decode steps are the rest but the first of them. Every iteration has new prompts, so no prefill is
served from the prefix cache."""

import time
from dataclasses import asdict, dataclass

import torch

from moeserve.bench.profile import synchronize
from moeserve.bench.throughput import random_prompts
from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams


@dataclass
class IterationTimes:
    step_seconds: list[float]
    prefill_steps: int  # the first steps, until every request had its first token
    e2e_seconds: float

    @property
    def prefill_seconds(self) -> float:
        return sum(self.step_seconds[: self.prefill_steps])

    @property
    def decode_step_seconds(self) -> list[float]:
        return self.step_seconds[self.prefill_steps + 1:]  # the first decode step is a warm-up


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between the two nearest ranks."""
    if not values:
        raise ValueError("no values to take a percentile of")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: list[float], scale: float = 1.0) -> dict | None:
    """Mean and p50 / p90 / p99 of values times scale (None without values)."""
    if not values:
        return None
    stats = {"mean": sum(values) / len(values)} | {f"p{q}": percentile(values, q) for q in (50, 90, 99)}
    return {k: v * scale for k, v in stats.items()}


@dataclass
class LatencyResult:
    engine: str
    batch_size: int
    prefill_ms: dict
    decode_step_ms: dict | None  # None when output_len leaves no steady decode step
    e2e_s: dict
    iterations: int

    @property
    def decode_tok_per_s(self) -> float | None:
        return None if self.decode_step_ms is None else 1000 * self.batch_size / self.decode_step_ms["p50"]

    def as_dict(self) -> dict:
        return asdict(self) | {"decode_tok_per_s": self.decode_tok_per_s}


TABLE_HEADER = ("| engine | prefill ms (p50) | decode step ms p50 / p90 / p99 | decode tok/s | e2e s (p50) |\n"
                "|---|---|---|---|---|")
HF_NOTE = ("transformers: one generate per iteration, its steps timed where generate hands the logits to a "
           "logits processor that waits for the device (prefill: up to the first; the first decode step skipped)")


def table_row(result: LatencyResult) -> str:
    step = result.decode_step_ms
    steps = "-" if step is None else f"{step['p50']:.2f} / {step['p90']:.2f} / {step['p99']:.2f}"
    rate = "-" if step is None else f"{result.decode_tok_per_s:.1f}"
    return f"| {result.engine} | {result.prefill_ms['p50']:.2f} | {steps} | {rate} | {result.e2e_s['p50']:.3f} |"


def run_latency(llm: LLM, batch_size: int, input_len: int, output_len: int, num_iters: int, num_iters_warmup: int,
                temperature: float = 1.0, seed: int = 0) -> LatencyResult:
    check_lengths(batch_size, input_len, output_len, num_iters)
    params = latency_params(output_len, temperature)
    batches = [random_prompts(llm.engine.config.vocab_size, batch_size, input_len, seed + i)  # new prompts each
               for i in range(num_iters_warmup + num_iters)]  # time: no prefix cache hits
    runs = [time_iteration(llm.engine, prompts, params) for prompts in batches][num_iters_warmup:]
    return LatencyResult("moeserve", batch_size, summary([r.prefill_seconds for r in runs], 1000),
                         summary([s for r in runs for s in r.decode_step_seconds], 1000),
                         summary([r.e2e_seconds for r in runs]), num_iters)


def check_lengths(batch_size: int, input_len: int, output_len: int, num_iters: int) -> None:
    for name, value in (("batch_size", batch_size), ("input_len", input_len), ("output_len", output_len),
                        ("num_iters", num_iters)):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def latency_params(output_len: int, temperature: float) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=output_len, ignore_eos=True)


def time_iteration(engine, prompts: list[dict], params: SamplingParams) -> IterationTimes:
    """One batch from submission to its last token, every step timed."""
    started: set[str] = set()
    step_seconds, prefill_steps = [], None
    start = time.perf_counter()
    request_ids = {engine.add_request(prompt, params) for prompt in prompts}
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        outputs = engine.step()
        step_seconds.append(time.perf_counter() - step_start)
        started |= {o.request_id for o in outputs if o.outputs[0].token_ids}
        if prefill_steps is None and started >= request_ids:
            prefill_steps = len(step_seconds)
    synchronize(engine.device)
    return IterationTimes(step_seconds, prefill_steps, time.perf_counter() - start)


def run_hf_latency(hf_model, prompts: list[dict], output_len: int, num_iters: int, num_iters_warmup: int,
                   temperature: float = 1.0) -> LatencyResult:
    """The same batch through transformers' generate, each step timed where generate hands its logits to a
    logits processor (which waits for them): the prefill up to the first, a decode step between two."""
    ids = torch.tensor([p["prompt_token_ids"] for p in prompts], device=hf_model.device)
    runs = [time_generate(hf_model, ids, output_len, temperature)
            for _ in range(num_iters_warmup + num_iters)][num_iters_warmup:]
    return LatencyResult("transformers generate", len(prompts), summary([r.prefill_seconds for r in runs], 1000),
                         summary([s for r in runs for s in r.decode_step_seconds], 1000),
                         summary([r.e2e_seconds for r in runs]), num_iters)


class StepClock:
    """A logits processor that notes when each step's logits are ready (it waits for the device)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        synchronize(scores.device)
        self.times.append(time.perf_counter())
        return scores


def time_generate(hf_model, ids: torch.Tensor, new_tokens: int, temperature: float) -> IterationTimes:
    from transformers import LogitsProcessorList

    sampling = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
    clock = StepClock()
    synchronize(ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=0, logits_processor=LogitsProcessorList([clock]),
                          **sampling)
    synchronize(ids.device)
    end = time.perf_counter()
    marks = [start, *clock.times]
    return IterationTimes([b - a for a, b in zip(marks, marks[1:])], 1, end - start)
