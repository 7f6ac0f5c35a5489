from dataclasses import dataclass, field

from moeserve.sampling_params import Logprob


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None  # "stop", "length", "abort"; None while running
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    """Everything generated so far for one request (cumulative, as vLLM's outputs are)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, float] = field(default_factory=dict)
