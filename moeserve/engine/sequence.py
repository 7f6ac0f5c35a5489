"""One completion being generated: its tokens, its progress through the model, its cache blocks."""

import enum
import time
from dataclasses import dataclass, field

import torch

from moeserve.sampling_params import Logprob, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens, or what the context leaves
    generator: torch.Generator | None = None  # seeded requests draw from their own stream
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)  # prompt + generated, as far as the host has read them
    num_pending_tokens: int = 0  # sampled on the device after token_ids, values not read yet (async scheduling)
    num_computed_tokens: int = 0  # tokens whose keys and values are in the cache
    block_table: list[int] = field(default_factory=list)
    block_row: int | None = None  # its row in the device block table, while it holds blocks
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks of token_ids
    num_cached_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    text: str = ""  # detokenized output, cut at a stop string
    held_back: int = 0  # trailing characters of `text` that may still become a stop string
    first_scheduled_time: float | None = None
    detokenizer: object | None = None  # IncrementalDetokenizer, when the model has a tokenizer
    stop_matcher: object | None = None  # StopMatcher, when the request has stop strings

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Its length, pending tokens included: what positions, blocks and sampling counts go by."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens the host has read (pending ones are not among them)."""
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def visible_text(self) -> str:
        return self.text if self.is_finished else self.text[: len(self.text) - self.held_back]
