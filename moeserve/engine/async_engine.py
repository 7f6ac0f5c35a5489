"""AsyncEngine: an engine stepping on a background thread, streaming outputs to asyncio callers.

`generate(prompt, params, request_id)` checks the request at once (bad input raises before anything
is queued), then yields a cumulative RequestOutput after every step that touched it. Leaving the
loop early (a client that disconnects) aborts the request and frees its blocks.

The thread drives either one Engine or, on rank 0 of a parallel layout, the LockstepEngine; then it
also steps every `heartbeat_s` while idle, so the other ranks never wait in a collective for longer
than that.
"""

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from moeserve.config import EngineArgs
from moeserve.engine.engine import Engine, Prompt, Request
from moeserve.engine.lockstep import LockstepEngine
from moeserve.engine.outputs import RequestOutput
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
        self.lockstep.submit({"prompt": request.prompt, "prompt_token_ids": request.prompt_token_ids},
                             request.params, request.request_id)

    def abort(self, request_id: str) -> None:
        self.lockstep.abort(request_id)

    def step(self) -> list[RequestOutput]:
        return self.lockstep.step()[0]

    def busy(self) -> bool:
        return not self.lockstep.idle

    def stop(self) -> None:
        self.lockstep.step(stop=True)


class AsyncEngine:
    def __init__(self, driver: LocalDriver | LockstepDriver, heartbeat_s: float | None = None):
        self.driver = driver
        self.engine = driver.engine
        self.heartbeat_s = heartbeat_s
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.wakeup = threading.Event()
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.streams_lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self.run_loop, name="moeserve-engine", daemon=True)
        self.thread.start()

    @classmethod
    def from_args(cls, args: EngineArgs) -> "AsyncEngine":
        return cls(LocalDriver(Engine(args)))

    async def generate(self, prompt: Prompt, params: SamplingParams | None, request_id: str) -> AsyncIterator[RequestOutput]:
        if self.stopping:
            raise RuntimeError("the engine is shutting down")
        request = self.engine.make_request(prompt, params, request_id)
        outputs: asyncio.Queue = asyncio.Queue()
        with self.streams_lock:
            if request_id in self.streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.streams[request_id] = (asyncio.get_running_loop(), outputs)
        self.send("add", request)
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                if isinstance(output, BaseException):
                    raise output
                finished = output.finished
                yield output
        finally:
            with self.streams_lock:
                self.streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.send("abort", request_id)

    @property
    def num_streams(self) -> int:
        return len(self.streams)

    def shutdown(self) -> None:
        """Abort every request (their streams end with an error) and stop the engine thread."""
        self.stopping = True
        self.wakeup.set()
        self.thread.join()

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
            for output in outputs:
                self.deliver(output.request_id, output)
        self.fail_all(RuntimeError("the engine shut down"))
        self.driver.stop()

    def apply_commands(self) -> None:
        while not self.commands.empty():
            command, argument = self.commands.get()
            if command == "add":
                self.driver.add(argument)
            else:
                self.driver.abort(argument)

    def fail_all(self, error: BaseException) -> None:
        with self.streams_lock:
            request_ids = list(self.streams)
        for request_id in request_ids:
            self.driver.abort(request_id)
            self.deliver(request_id, error)
