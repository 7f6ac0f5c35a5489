"""SamplingParams: what a request asks of the sampler, with vLLM's names, defaults and ranges; Logprob: what
the sampler reports of a token."""

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
MAX_N = 128
SEED_RANGE = (-(2**63), 2**63 - 1)  # vLLM's: a torch int64
MAX_TEMPERATURE = 100.0  # beyond it every distribution is already uniform to fp32
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # outside it logits overflow fp32 (1e-40 gave NaN)
LOGIT_BIAS_LIMIT = 100.0  # biases are clamped to [-100, 100], as OpenAI does
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 16384  # all stop strings together


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token


class RequestError(ValueError):
    """Bad input in a request; `field` names the request field at fault, the message says what to do."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


class SamplingParamsError(RequestError):
    """A sampling parameter out of range; the message names the field and its allowed range."""


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (the sampled one is added)
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: list[int] | None = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.validate()
        self.logit_bias = {int(k): max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(v)))
                           for k, v in self.logit_bias.items()}

    def validate(self) -> None:
        check = _Checker()
        check.int_range("n", self.n, 1, MAX_N)
        check.float_range("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        check.that("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]", self.top_p)
        check.that("top_k", isinstance(self.top_k, int) and (self.top_k >= 1 or self.top_k in (0, -1)),
                   "must be 0 or -1 (off) or a positive integer", self.top_k)
        check.float_range("min_p", self.min_p, 0.0, 1.0)
        check.float_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        check.float_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        check.float_range("repetition_penalty", self.repetition_penalty, *REPETITION_PENALTY_RANGE)
        if self.max_tokens is not None:
            check.int_range("max_tokens", self.max_tokens, 1, None)
        check.int_range("min_tokens", self.min_tokens, 0, self.max_tokens)
        if self.seed is not None:
            check.int_range("seed", self.seed, *SEED_RANGE)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                check.int_range(name, value, 0, MAX_LOGPROBS)
        check.that("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings", self.stop)
        check.that("stop", len(self.stop) <= MAX_STOP_STRINGS, f"may hold at most {MAX_STOP_STRINGS} strings",
                   f"{len(self.stop)} strings")
        check.that("stop", sum(map(len, self.stop)) <= MAX_STOP_CHARS,
                   f"may hold at most {MAX_STOP_CHARS} characters in all", f"{sum(map(len, self.stop))} characters")
        check.that("logit_bias", all(is_number(v) and math.isfinite(v) for v in self.logit_bias.values()),
                   "values must be finite numbers", self.logit_bias)
        check.that("allowed_token_ids", self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
                   "must not be empty", self.allowed_token_ids)

    def check_token_ids(self, vocab_size: int) -> None:
        """Token ids in the request must exist in the model's vocabulary."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias),
                          ("allowed_token_ids", self.allowed_token_ids or [])):
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise SamplingParamsError(name, f"SamplingParams.{name}: token id {bad[0]} is outside the vocabulary "
                                          f"[0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


class _Checker:
    def that(self, name, ok, rule, value):
        if not ok:
            raise SamplingParamsError(name, f"SamplingParams.{name} {rule}, got {value!r}")

    def int_range(self, name, value, low, high):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
        self.that(name, ok, f"must be an integer in [{low}, {'inf' if high is None else high}]", value)

    def float_range(self, name, value, low, high):
        ok = is_number(value) and math.isfinite(value) and value >= low and (high is None or value <= high)
        self.that(name, ok, f"must be a finite number in [{low}, {'inf' if high is None else high}]", value)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
