"""`moeserve serve`: the HTTP server on rank 0, the engine behind it (in lockstep on every rank when the
layout has several)."""

import contextlib
import logging
import signal

import uvicorn

from moeserve.config import EngineArgs
from moeserve.engine.async_engine import AsyncEngine, LocalDriver, LockstepDriver
from moeserve.engine.engine import Engine
from moeserve.engine.lockstep import LockstepEngine
from moeserve.server.app import ServerConfig, build_app

logger = logging.getLogger(__name__)


def serve(engine_args: EngineArgs, config: ServerConfig, host: str, port: int, context=None) -> None:
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
    async_engine = AsyncEngine(driver, heartbeat)
    app = build_app(async_engine, config)

    @app.on_event("startup")
    async def ready():
        url = f"http://{host}:{port}"
        auth = f" -H 'Authorization: Bearer {config.api_key}'" if config.api_key else ""
        print(f"moeserve is serving {config.model_name} at {url}. Try:\n"
              f"curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
              f"-d '{{\"model\": \"{config.model_name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'", flush=True)

    server = QuietServer(uvicorn.Config(app, host=host, port=port, log_level="info"))
    for sig in (signal.SIGINT, signal.SIGTERM):  # stop taking requests, finish the open responses, then return
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run()
    finally:
        async_engine.shutdown()  # aborts what is still running; in lockstep, tells the other ranks to stop


class QuietServer(uvicorn.Server):
    """uvicorn re-raises SIGINT / SIGTERM after shutting down, which would end the process before the
    engine (and, in lockstep, the other ranks) can stop; the handlers above take its place."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield
