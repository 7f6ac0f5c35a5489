"""AsyncEngine: an engine stepping on a background thread, streaming outputs to asyncio callers.

`await add_request(prompt, params, request_id)` checks and tokenizes the request on a worker thread
(so a long prompt never stalls the event loop; bad input raises before anything is queued) and returns
a RequestStream of cumulative RequestOutputs, one after every step that touched it; `generate` is the
same as an async generator. Leaving early (a client that disconnects) aborts the request and frees its
blocks. `finish_reasons` and `num_aborted` count how completions ended, for metrics: each of a
request's n completions once, when the request ends (as aborted if it was).

The thread drives either one Engine or, on rank 0 of a parallel layout, the LockstepEngine; then it
also steps every `heartbeat_s` while idle, so the other ranks never wait in a collective for longer
than that.
"""

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from moeserve.engine.args import EngineArgs
from moeserve.engine.engine import Engine, Prompt, Request
from moeserve.engine.lockstep import LockstepEngine
from moeserve.engine.outputs import RequestOutput
from moeserve.engine.stats import EngineState, StatsLogger
from moeserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LocalDriver:
    def __init__(self, engine: Engine):
        self.engine = engine

    def add(self, request: Request) -> None:
        self.engine.add(request)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def step(self) -> list[RequestOutput]:
        return self.engine.step()

    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def stop(self) -> None:
        pass


class LockstepDriver:
    """Rank 0's side of the lockstep engine."""

    def __init__(self, lockstep: LockstepEngine):
        self.lockstep = lockstep
        self.engine = lockstep.engine

    def add(self, request: Request) -> None:
        self.lockstep.submit_request(request)

    def abort(self, request_id: str) -> None:
        self.lockstep.abort(request_id)

    def step(self) -> list[RequestOutput]:
        return self.lockstep.step()[0]

    def busy(self) -> bool:
        return not self.lockstep.idle

    def stop(self) -> None:
        self.lockstep.step(stop=True)


class AsyncEngine:
    def __init__(self, driver: LocalDriver | LockstepDriver, heartbeat_s: float | None = None,
                 stats_interval_s: float | None = None):
        self.driver = driver
        self.engine = driver.engine
        self.heartbeat_s = heartbeat_s
        self.stats = StatsLogger(self.engine, stats_interval_s) if stats_interval_s else None
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.wakeup = threading.Event()
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.streams_lock = threading.RLock()  # RLock: RequestStream.__del__ may run while it is held
        self.stopping = False
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeserve-tokenize")
        self.finish_reasons: Counter = Counter()  # completions that ended with "stop" or "length"
        self.num_aborted = 0  # completions of requests that ended early (client gone, shutdown, engine error)
        self.thread = threading.Thread(target=self.run_loop, name="moeserve-engine", daemon=True)
        self.thread.start()

    @classmethod
    def from_args(cls, args: EngineArgs, stats_interval_s: float | None = None) -> "AsyncEngine":
        return cls(LocalDriver(Engine(args)), stats_interval_s=stats_interval_s)

    async def add_request(self, prompt: Prompt, params: SamplingParams | None, request_id: str) -> "RequestStream":
        """Check, tokenize and queue a request (bad input raises here, before anything is queued); iterate
        the returned stream for its outputs and close it when done (a running request is aborted)."""
        if self.stopping:
            raise RuntimeError("the engine is shutting down")
        request = await self.off_loop(self.engine.make_request, prompt, params, request_id)
        outputs: asyncio.Queue = asyncio.Queue()
        with self.streams_lock:  # fail_all lists the streams under it: this one is failed there or sees stopping here
            if self.stopping:  # shut down while it was tokenized: nothing would ever answer it
                raise RuntimeError("the engine is shutting down")
            if request_id in self.streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.streams[request_id] = (asyncio.get_running_loop(), outputs)
        self.send("add", request)
        return RequestStream(self, request_id, outputs, len(request.seqs))

    async def off_loop(self, fn, *args):
        """fn(*args) on the tokenizing thread: work that grows with the input (tokenizing, chat templates)."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)

    async def generate(self, prompt: Prompt, params: SamplingParams | None, request_id: str) -> AsyncIterator[RequestOutput]:
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        self.send("abort", request_id)

    @property
    def num_streams(self) -> int:
        return len(self.streams)

    # What a server reads of the engine beside requests: the model's limits, its tokenizer, its state.
    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.config.vocab_size

    @property
    def has_tokenizer(self) -> bool:
        return self.engine.tokenizer is not None

    def encode(self, text: str, field: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        return self.engine.encode(text, field, add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        return self.engine.decode(token_ids)

    def detokenize(self, token_ids: list[int]) -> str:
        return self.engine.detokenize(token_ids)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return self.engine.token_strings(token_ids)

    def apply_chat_template(self, messages: list[dict], template: str | None, add_generation_prompt: bool) -> str:
        return self.engine.apply_chat_template(messages, template, add_generation_prompt)

    def state(self) -> EngineState:
        return self.engine.state()

    def expert_imbalance(self) -> dict[int, float]:
        return self.engine.expert_imbalance()

    def expert_load(self) -> dict[int, list[int]]:
        return self.engine.expert_load()

    def shutdown(self) -> None:
        """Abort every request (their streams end with an error) and stop the engine thread."""
        self.stopping = True
        self.wakeup.set()
        self.thread.join()
        self.tokenizing.shutdown(wait=False, cancel_futures=True)

    def send(self, command: str, argument) -> None:
        self.commands.put((command, argument))
        self.wakeup.set()

    def deliver(self, request_id: str, item) -> None:
        with self.streams_lock:
            stream = self.streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, item)

    def run_loop(self) -> None:
        last_step = time.monotonic()
        while not self.stopping:
            self.apply_commands()
            if not self.driver.busy():
                self.wakeup.wait(timeout=self.heartbeat_s)
                self.wakeup.clear()
                due = self.heartbeat_s is not None and time.monotonic() - last_step >= self.heartbeat_s
                if not due:
                    continue
            try:
                outputs = self.driver.step()
            except Exception as error:  # fail the running requests, keep serving new ones
                logger.exception("engine step failed; aborting %d requests", len(self.engine.requests))
                self.fail_all(error)
                continue
            last_step = time.monotonic()
            if self.stats is not None:
                self.stats.maybe_log(last_step)
            for output in outputs:
                output.metrics["time"] = last_step  # when it was produced, on the server's clock
                if output.finished:
                    self.finish_reasons.update(c.finish_reason for c in output.outputs if c.finish_reason != "abort")
                self.deliver(output.request_id, output)
        self.fail_all(RuntimeError("the engine shut down"))
        self.driver.stop()

    def apply_commands(self) -> None:
        while not self.commands.empty():
            command, argument = self.commands.get()
            if command == "abort":
                self.driver.abort(argument)
                continue
            try:
                self.driver.add(argument)
            except ValueError as error:  # e.g. its id still in use: that request fails, the engine goes on
                self.deliver(argument.request_id, error)

    def fail_all(self, error: BaseException) -> None:
        with self.streams_lock:
            request_ids = list(self.streams)
        for request_id in request_ids:
            self.driver.abort(request_id)
            self.deliver(request_id, error)


class RequestStream:
    """The outputs of one request (of `num_completions` completions), as the engine produces them;
    `arrival` is when it was queued."""

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: asyncio.Queue, num_completions: int):
        self.engine, self.request_id, self.outputs = engine, request_id, outputs
        self.num_completions = num_completions
        self.arrival = time.monotonic()
        self.finished = self.closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self.closed:
            raise StopAsyncIteration
        output = await self.outputs.get()
        if isinstance(output, BaseException):
            self.close()
            raise output
        self.finished = output.finished
        return output

    def __del__(self) -> None:  # a stream dropped unread (a client gone before its response began)
        self.close()

    def close(self, count_abort: bool = True) -> None:
        """Stop listening; a request that has not finished is aborted (and counted as aborted, unless
        count_abort is False: one withdrawn before it was served, e.g. beside a refused prompt)."""
        if self.closed:
            return
        self.closed = True
        with self.engine.streams_lock:
            self.engine.streams.pop(self.request_id, None)
        if not self.finished:
            if count_abort:
                self.engine.num_aborted += self.num_completions
            self.engine.abort(self.request_id)
