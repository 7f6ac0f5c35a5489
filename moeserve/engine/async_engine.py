"""AsyncEngine: the engine stepping on a background thread, streaming outputs to asyncio callers.

`generate(prompt, params, request_id)` checks the request at once (bad input raises before anything
is queued), then yields a cumulative RequestOutput after every step that touched it. Leaving the
loop early (a client that disconnects) aborts the request and frees its blocks.
"""

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from moeserve.config import EngineArgs
from moeserve.engine.engine import Engine, Prompt
from moeserve.engine.outputs import RequestOutput
from moeserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, args: EngineArgs):
        self.engine = Engine(args)
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.wakeup = threading.Event()
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.streams_lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self.run_loop, name="moeserve-engine", daemon=True)
        self.thread.start()

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
        while not self.stopping:
            self.apply_commands()
            if not self.engine.has_unfinished_requests():
                self.wakeup.wait()
                self.wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # fail the running requests, keep serving new ones
                logger.exception("engine step failed; aborting %d requests", len(self.engine.requests))
                self.fail_all(error)
                continue
            for output in outputs:
                self.deliver(output.request_id, output)
        self.fail_all(RuntimeError("the engine shut down"))

    def apply_commands(self) -> None:
        while not self.commands.empty():
            command, argument = self.commands.get()
            if command == "add":
                self.engine.add(argument)
            else:
                self.engine.abort(argument)

    def fail_all(self, error: BaseException) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            self.deliver(request_id, error)
