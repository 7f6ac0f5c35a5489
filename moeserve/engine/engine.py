"""The engine: requests in, tokens out, one scheduled step at a time.

A step is launched (scheduled, its inputs sent, the forward and the draw queued on the device) and then
finished (its sampled ids read, tokens appended, stop conditions checked, text detokenized, outputs made).
With async scheduling (the default on CUDA) the engine keeps one step in flight: each call launches step
N+1 and then finishes step N while the device runs N+1, and returns N's outputs (the first call returns
none). Sequences sampled in N are scheduled in N+1 with their token pending (see Scheduler); a sequence
found finished when N is finished had its row of N+1 computed for nothing, and that row is dropped."""

import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass

import torch

from moeserve.distributed.launch import DistributedContext, resolve_device
from moeserve.engine.args import EngineArgs
from moeserve.engine.block_manager import BlockManager
from moeserve.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from moeserve.engine.model_runner import ModelRunner, StepResult
from moeserve.engine.outputs import CompletionOutput, RequestOutput
from moeserve.engine.scheduler import Scheduler
from moeserve.engine.sequence import Sequence
from moeserve.engine.stats import EngineCounters, EngineState, PreemptionLog
from moeserve.loader.model_loader import load_config
from moeserve.loader.presets import SHAPE_PRESETS
from moeserve.loader.tokenizer import load_tokenizer
from moeserve.sampling_params import Logprob, RequestError, SamplingParams

logger = logging.getLogger(__name__)
WARM_UP_PROMPT_LEN = 300  # tokens of the longest dummy prompt (not a multiple of 16: both sides of Triton's
# divisibility specialization come up across the rounds)

Prompt = str | dict  # text, or {"prompt_token_ids": [...]} (vLLM's TokensPrompt)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]


@dataclass
class LaunchedStep:
    scheduled: list[Sequence]
    result: StepResult



def powers_of_two(lowest: int, highest: int) -> list[int]:
    """lowest, 2 * lowest, 4 * lowest, ... while <= highest."""
    sizes = []
    while lowest <= highest:
        sizes.append(lowest)
        lowest *= 2
    return sizes

class Engine:
    """One rank's engine. With a DistributedContext it holds this rank's shard of the model and its
    own KV cache; LockstepEngine steps the ranks together."""

    def __init__(self, args: EngineArgs, context: DistributedContext | None = None):
        config = load_config(args.model)
        if args.block_size is None:  # MLA decode reads whole tiles from one block when blocks hold 64
            mla_on_gpu = config.mla is not None and resolve_device(args.device).startswith("cuda")
            args = dataclasses.replace(args, block_size=64 if mla_on_gpu else 16)
        self.config = config
        self.max_model_len = args.max_model_len or config.max_position_embeddings
        self.tokenizer = None if args.model in SHAPE_PRESETS else self.try_load_tokenizer(args.model)
        self.tokenizer_lock = threading.Lock()  # decoding: the engine's thread and readers of its outputs
        # Requests are tokenized on their callers' threads, with a copy of their own: a long prompt being
        # encoded never holds up the detokenization of running requests.
        self.encoder = copy.deepcopy(self.tokenizer)
        self.encoder_lock = threading.Lock()
        self.max_prompt_chars = prompt_chars_bound(self.tokenizer, self.max_model_len)
        eos = set(config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))

        self.runner = ModelRunner(args, config, self.max_model_len, self.eos_token_ids, context)
        num_blocks = self.runner.num_blocks
        # one step in flight; lockstep ranks step synchronously (every rank's outputs come back at its exchange)
        on_cuda = self.runner.device.type == "cuda"
        self.async_scheduling = context is None and (args.async_scheduling if args.async_scheduling is not None
                                                     else on_cuda)
        self.start_fresh(args)
        if context is None and (args.warm_up if args.warm_up is not None else on_cuda):
            self.warm_up(args.max_num_batched_tokens)
            self.start_fresh(args)
            self.runner.reset_expert_load()
        capacity = num_blocks * args.block_size
        logger.info("KV cache (%s): %d tokens (%d blocks of %d); max concurrency %.1f at %d tokens per request",
                    str(self.kv_cache_dtype).removeprefix("torch."), capacity, num_blocks, args.block_size,
                    capacity / self.max_model_len, self.max_model_len)

    def start_fresh(self, args: EngineArgs) -> None:
        """No requests, every KV block free, no prefix cached, counters at zero."""
        assert getattr(self, "in_flight", None) is None, "a step is still in flight"
        self.block_manager = BlockManager(self.runner.num_blocks, args.block_size, args.enable_prefix_caching,
                                          block_table=self.runner.block_table)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens)
        self.in_flight: LaunchedStep | None = None
        self.requests: dict[str, Request] = {}
        self.request_counter = itertools.count()
        self.counters = EngineCounters()
        self.preemption_log = PreemptionLog()

    def warm_up(self, max_step_tokens: int) -> None:
        """Greedy dummy requests through prefill and decode, so that the kernels of both paths are compiled
        (Triton compiles at first use, seconds in all) before a real request waits on them; the rounds are
        `warm_up_rounds`. Sampling runs torch ops only, which need no warm-up."""
        start = time.perf_counter()
        if self.max_model_len < 4:
            return
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        for prompts in self.warm_up_rounds(max_step_tokens, params.max_tokens):
            for ids in prompts:
                self.add(self.make_request({"prompt_token_ids": ids}, params))
            while self.has_unfinished_requests():
                self.step()
        logger.info("Warmed up prefill and decode in %.1f s", time.perf_counter() - start)

    def warm_up_rounds(self, max_step_tokens: int, max_tokens: int) -> list[list[list[int]]]:
        """Prompts of different lengths together; one alone that is a prefix of the first round's (other
        token counts, and a prefix-cache hit); then steps of 32, 64, ... prompt tokens up to a full step
        (several prompts where one may not be that long), so that every size bucket of the kernels' block
        configurations (tuned per row count) is met. Those prompts start with first tokens of their own:
        no cached prefix shortens them."""
        vocab = self.config.vocab_size
        firsts = itertools.count(1)

        def prompt(length: int, first: int = 0) -> list[int]:
            return [first % vocab] + [i % vocab for i in range(1, length)]

        per_request = self.max_model_len - max_tokens
        longest = min(WARM_UP_PROMPT_LEN, per_request)
        rounds = [[prompt(longest), prompt(max(1, longest // 7))], [prompt(max(1, longest // 4))]]
        kv_tokens = self.block_manager.num_free_blocks * self.block_manager.block_size
        full_step = min(max_step_tokens, kv_tokens // 2, self.scheduler.max_num_seqs * per_request)
        for total in powers_of_two(32, full_step if per_request >= 32 else 0):  # none for toy context lengths
            sizes = [per_request] * (total // per_request) + ([total % per_request] if total % per_request else [])
            rounds.append([prompt(size, next(firsts)) for size in sizes])
        return rounds

    @property
    def model(self):
        return self.runner.model

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        return self.runner.kv_cache_dtype

    def state(self) -> EngineState:
        scheduler, blocks = self.scheduler, self.block_manager
        return EngineState(len(scheduler.running), len(scheduler.waiting), blocks.usage, scheduler.num_preemptions,
                           blocks.prefix_queries, blocks.prefix_hits)

    def expert_imbalance(self) -> dict[int, float]:
        """Per MoE layer: max over mean tokens per EP rank so far (1.0 without expert parallelism)."""
        return self.runner.expert_imbalance()

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert so far, per MoE layer: layer index -> counts [E]."""
        return self.runner.expert_load()

    @staticmethod
    def try_load_tokenizer(model: str):
        try:
            tokenizer = load_tokenizer(model)
            tokenizer.model_max_length = sys.maxsize  # lengths are checked here, against max_model_len
            return tokenizer
        except FileNotFoundError:
            logger.warning("%s has no tokenizer: prompts must be token ids and outputs have no text", model)
            return None

    # Requests

    def make_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None) -> Request:
        """Check and tokenize a request without touching the engine's state (safe from any thread)."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self.request_counter))
        text, token_ids = self.tokenize(prompt)
        if not token_ids:
            raise RequestError("prompt", "the prompt is empty")
        if not all(0 <= t < self.config.vocab_size for t in token_ids):
            raise RequestError("prompt", f"prompt token ids must be in [0, {self.config.vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise RequestError("prompt", f"the prompt has {len(token_ids)} tokens; max_model_len is {self.max_model_len}, which "
                             "must leave room for at least one generated token")
        max_tokens = params.max_tokens or self.max_model_len - len(token_ids)
        if len(token_ids) + max_tokens > self.max_model_len:
            raise RequestError("max_tokens", f"max_tokens={max_tokens} with a {len(token_ids)}-token prompt exceeds max_model_len="
                             f"{self.max_model_len}; lower max_tokens to at most {self.max_model_len - len(token_ids)}")
        params.check_token_ids(self.config.vocab_size)
        if params.stop and self.tokenizer is None:
            raise RequestError("stop", "stop strings need a tokenizer, and this model has none; use stop_token_ids")
        seqs = [self.make_sequence(request_id, i, token_ids, params, max_tokens) for i in range(params.n)]
        return Request(request_id, text, token_ids, params, seqs)

    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        if not isinstance(text, str):
            raise RequestError("prompt", "a prompt is a string or {'prompt_token_ids': [...]}")
        if self.tokenizer is None:
            raise RequestError("prompt", "this model has no tokenizer: pass {'prompt_token_ids': [...]}")
        return text, self.encode(text, "prompt")

    def encode(self, text: str, field: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; text that cannot fit max_model_len or is not Unicode is refused first."""
        check_unicode(text, field)
        if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            raise RequestError(field, f"{field} has {len(text)} characters, more than the {self.max_model_len} tokens "
                                      f"of max_model_len can hold (at most {self.max_prompt_chars} characters)")
        with self.encoder_lock:
            return self.encoder.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def detokenize(self, token_ids: list[int]) -> str:
        """decode for callers off the engine's thread, on their copy: a long text never holds up the
        detokenizing of running requests."""
        with self.encoder_lock:
            return self.encoder.decode(token_ids)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """The vocabulary's strings of the tokens (byte-level ones as the vocabulary spells them)."""
        with self.encoder_lock:
            return self.encoder.convert_ids_to_tokens(token_ids)

    def apply_chat_template(self, messages: list[dict], template: str | None, add_generation_prompt: bool) -> str:
        """The messages ({role, content}) as prompt text; `template` None: the tokenizer's own."""
        return self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def make_sequence(self, request_id, index, token_ids, params, max_tokens) -> Sequence:
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed((params.seed + index) % 2**64)
        seq = Sequence(request_id, index, list(token_ids), params, max_tokens, generator)
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]  # the first prompt token has no logprob
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
            seq.stop_matcher = StopMatcher(params.stop) if params.stop else None
        return seq

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        request = self.make_request(prompt, params, request_id)
        self.add(request)
        return request.request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self.output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # Steps

    def step(self, lockstep: bool = False) -> list[RequestOutput]:
        """One scheduled step. In lockstep with other ranks a step without work still runs a forward. With
        async scheduling: launch the next step, then finish the one in flight and return its outputs."""
        if not self.async_scheduling or lockstep:
            launched = self.launch(lockstep)
            return self.finish(launched) if launched is not None else []
        launched = self.launch()
        finishing, self.in_flight = self.in_flight, launched
        return self.finish(finishing) if finishing is not None else []

    @contextlib.contextmanager
    def synchronous_steps(self):
        """Within the block every step finishes before it returns (none left in flight); the step in flight
        on entry is finished first, its outputs given to the block."""
        outputs = self.finish(self.in_flight) if self.in_flight is not None else []
        self.in_flight = None
        async_on, self.async_scheduling = self.async_scheduling, False
        try:
            yield outputs
        finally:
            self.async_scheduling = async_on

    def launch(self, lockstep: bool = False) -> LaunchedStep | None:
        """Schedule a step and queue its work on the device; None when there was nothing to schedule."""
        scheduled = self.scheduler.schedule()
        self.preemption_log.update(self.scheduler.num_preemptions)
        if not scheduled:
            if lockstep:
                self.runner.execute_empty()
            return None
        result = self.runner.execute(scheduled)
        for seq, num_new in scheduled:
            self.counters.prompt_tokens += max(0, min(num_new, seq.num_prompt_tokens - seq.num_computed_tokens))
            seq.num_computed_tokens += num_new
        for seq in result.sampled:
            seq.num_pending_tokens += 1
        return LaunchedStep([seq for seq, _ in scheduled], result)

    def finish(self, step: LaunchedStep) -> list[RequestOutput]:
        """Read a launched step's tokens (waiting for them) and make its outputs. Sequences finished (or
        aborted) since it was launched are left as they are: their rows were computed for nothing."""
        result = step.result
        output = result.output.wait() if result.output is not None else None
        live = [seq for seq in step.scheduled if not seq.is_finished]
        for seq in live:
            for index, entry in result.prompt_logprobs.get(id(seq), []):
                if index == len(seq.prompt_logprobs):
                    seq.prompt_logprobs.append(entry)
        touched: dict[str, Request] = {}
        sampled = [] if output is None else list(zip(result.sampled, output.token_ids, output.logprobs))
        for seq, token, logprobs in sampled:
            if not seq.is_finished:
                self.append_token(seq, token, logprobs)
                self.counters.generation_tokens += 1
                touched[seq.request_id] = self.requests[seq.request_id]
        for seq in live:
            self.block_manager.cache_full_blocks(seq)  # before a finished one frees its blocks
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
        outputs = [self.output(request) for request in touched.values()]
        for output in outputs:
            if output.finished:
                del self.requests[output.request_id]
        return outputs

    def append_token(self, seq: Sequence, token: int, logprobs: dict[int, Logprob] | None) -> None:
        """Its oldest pending token, now read; the stop conditions go by the tokens read so far."""
        seq.token_ids.append(token)
        seq.num_pending_tokens -= 1
        if logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token].logprob
        params = seq.params
        if not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        else:
            self.update_text(seq)
        if seq.finish_reason is None and (len(seq.output_token_ids) >= seq.max_tokens or
                                          len(seq.token_ids) >= self.max_model_len):
            seq.finish_reason = "length"

    def update_text(self, seq: Sequence) -> None:
        if seq.detokenizer is None:
            return
        with self.tokenizer_lock:
            new = seq.detokenizer.new_text(seq.token_ids)
        seq.text += new
        if seq.stop_matcher is None:
            return
        found = seq.stop_matcher.feed(new)
        # held back before min_tokens too: a stop string begun now may complete once stops count
        seq.held_back = seq.stop_matcher.partial_length
        if found is not None and len(seq.output_token_ids) >= seq.params.min_tokens:
            start, stop = found
            seq.text = seq.text[: start + (len(stop) if seq.params.include_stop_str_in_output else 0)]
            seq.finish_reason, seq.stop_reason = "stop", stop
            seq.held_back = 0

    def output(self, request: Request) -> RequestOutput:
        wants_logprobs = request.params.logprobs is not None
        completions = [
            CompletionOutput(
                index=seq.index,
                text=seq.visible_text,
                token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob if wants_logprobs else None,
                logprobs=list(seq.logprobs) if wants_logprobs else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for seq in request.seqs
        ]
        first = request.seqs[0]
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=list(first.prompt_logprobs) if request.params.prompt_logprobs is not None else None,
            outputs=completions,
            finished=all(seq.is_finished for seq in request.seqs),
            metrics={"queue_time": first.first_scheduled_time - first.arrival_time}
            if first.first_scheduled_time is not None else {},
        )


LENGTH_KEEPING_NORMALIZERS = {"NFD", "NFKD", "Lowercase", "Prepend"}  # each character becomes one or more
LENGTH_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation"}


def prompt_chars_bound(tokenizer, max_model_len: int) -> int | None:
    """The most characters a text that fits max_model_len tokens can have, known without tokenizing it:
    the vocabulary's longest token string times max_model_len. It holds only when every character of
    the text ends up in some token (byte-level and SentencePiece token strings spell their text out);
    for a tokenizer that may drop characters (a normalizer that strips, a pre-tokenizer that splits on
    whitespace, unknown words as one token) there is no such bound: None."""
    if tokenizer is None or not keeps_every_character(tokenizer):
        return None
    return max_model_len * max(map(len, tokenizer.get_vocab()), default=1)


def keeps_every_character(tokenizer) -> bool:
    """Whether the fast tokenizer's pipeline provably turns every character of a text into tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: nothing to inspect
        return False
    spec = json.loads(backend.to_str())
    pre_tokenizers = pipeline_steps(spec["pre_tokenizer"], "pretokenizers")
    return (all(map(normalizer_keeps_length, pipeline_steps(spec["normalizer"], "normalizers")))
            and any(step["type"] in ("ByteLevel", "Metaspace") for step in pre_tokenizers)
            and all(step["type"] in LENGTH_KEEPING_PRE_TOKENIZERS and step.get("behavior") != "Removed"
                    for step in pre_tokenizers)
            and model_tokenizes_every_character(spec["model"]))


def pipeline_steps(step: dict | None, children: str) -> list[dict]:
    if step is None:
        return []
    if step["type"] == "Sequence":
        return [leaf for child in step[children] for leaf in pipeline_steps(child, children)]
    return [step]


def normalizer_keeps_length(step: dict) -> bool:
    if step["type"] == "Replace":  # a string replaced by one at least as long
        return "String" in step["pattern"] and len(step["content"]) >= len(step["pattern"]["String"])
    return step["type"] in LENGTH_KEEPING_NORMALIZERS


def model_tokenizes_every_character(model: dict) -> bool:
    """False where a run of unknown characters may become one unknown token."""
    if model["type"] == "BPE":
        return bool(model.get("byte_fallback") or not model.get("fuse_unk"))
    return model["type"] == "Unigram" and bool(model.get("byte_fallback"))


def check_unicode(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(field, f"{field} is not valid Unicode: {text[error.start:error.end]!r} at index "
                                  f"{error.start} is a lone surrogate; send UTF-8 text") from None
