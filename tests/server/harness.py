"""A real uvicorn server on a loopback port, over an AsyncEngine of a tiny model."""

import threading
import time
from types import SimpleNamespace

import uvicorn

from moeserve.config import EngineArgs
from moeserve.distributed.launch import free_port
from moeserve.engine.async_engine import AsyncEngine
from moeserve.server.app import ServerConfig, build_app

MODEL, KEY = "tiny-mixtral", "test-key"


def start_server(config: ServerConfig, stats_interval_s: float | None = None, **engine_args):
    engine = AsyncEngine.from_args(EngineArgs(model=MODEL, **engine_args), stats_interval_s)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(engine, config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    return SimpleNamespace(url=f"http://127.0.0.1:{port}", engine=engine, server=server, thread=thread)


def stop_server(running):
    running.server.should_exit = True
    running.thread.join(timeout=30)
    running.engine.shutdown()


def headers():
    return {"Authorization": f"Bearer {KEY}"}


def wait_until_idle(engine, seconds=30):
    manager = engine.engine.block_manager
    deadline = time.monotonic() + seconds
    while (engine.engine.has_unfinished_requests() or manager.num_free_blocks < manager.num_blocks) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not engine.engine.has_unfinished_requests() and manager.num_free_blocks == manager.num_blocks
