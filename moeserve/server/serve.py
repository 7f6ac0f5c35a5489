"""`moeserve serve`: the HTTP server on rank 0, the engine behind it (in lockstep on every rank when the
layout has several)."""

import contextlib
import json
import logging
import signal
from dataclasses import dataclass

import uvicorn

from moeserve.engine.args import EngineArgs
from moeserve.engine.async_engine import AsyncEngine, LocalDriver, LockstepDriver
from moeserve.engine.engine import Engine
from moeserve.engine.lockstep import LockstepEngine
from moeserve.server.app import ServerConfig, build_app

logger = logging.getLogger(__name__)


@dataclass
class ListenOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    uvicorn_log_level: str = "info"
    stats_interval_s: float | None = 10.0  # None: no periodic stats line


def serve(engine_args: EngineArgs, config: ServerConfig, listen: ListenOptions, context=None) -> None:
    engine = Engine(engine_args, context)
    if context is not None:
        lockstep = LockstepEngine(engine, context)
        if context.rank != 0:
            lockstep.follow()  # until rank 0 shuts down
            return
        driver = LockstepDriver(lockstep)
        heartbeat = min(5.0, engine_args.dist_timeout / 4)  # idle ranks must hear from rank 0 before the timeout
    else:
        driver, heartbeat = LocalDriver(engine), None
    async_engine = AsyncEngine(driver, heartbeat, listen.stats_interval_s)
    app = build_app(async_engine, config)

    @app.on_event("startup")
    async def ready():
        print(ready_message(config, listen), flush=True)

    server = QuietServer(uvicorn_config(app, listen))
    for sig in (signal.SIGINT, signal.SIGTERM):  # stop taking requests, finish the open responses, then return
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run()
    finally:
        async_engine.shutdown()  # aborts what is still running; in lockstep, tells the other ranks to stop


def uvicorn_config(app, listen: ListenOptions) -> uvicorn.Config:
    return uvicorn.Config(app, host=listen.host, port=listen.port, log_level=listen.uvicorn_log_level,
                          ssl_keyfile=listen.ssl_keyfile, ssl_certfile=listen.ssl_certfile)


def ready_message(config: ServerConfig, listen: ListenOptions) -> str:
    """Where to reach the server, with a curl line to paste; the API key stays out of logs (a placeholder)."""
    scheme = "https" if listen.ssl_certfile else "http"
    url = f"{scheme}://{listen.host}:{listen.port}"
    auth = " -H \"Authorization: Bearer $MOESERVE_API_KEY\"" if config.api_key else ""
    body = json.dumps({"model": config.model_name, "prompt": "Hello", "max_tokens": 16})
    return (f"moeserve is serving {config.model_name} at {url}. Try:\n"
            f"curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'")


class QuietServer(uvicorn.Server):
    """uvicorn re-raises SIGINT / SIGTERM after shutting down, which would end the process before the
    engine (and, in lockstep, the other ranks) can stop; the handlers above take its place."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield
