"""A real uvicorn server on a loopback port, over an AsyncEngine of a tiny model, started through
serve's own ListenOptions -> uvicorn.Config path."""

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import uvicorn

from moeserve.engine.args import EngineArgs
from moeserve.distributed.launch import free_port
from moeserve.engine.async_engine import AsyncEngine
from moeserve.loader.presets import materialize
from moeserve.server.app import ServerConfig, build_app
from moeserve.server.serve import ListenOptions, uvicorn_config

MODEL, KEY = "tiny-mixtral", "test-key"


def start_server(config: ServerConfig, stats_interval_s: float | None = None, model: str = MODEL,
                 listen: ListenOptions | None = None, **engine_args):
    engine = AsyncEngine.from_args(EngineArgs(model=model, **engine_args), stats_interval_s)
    listen = dataclasses.replace(listen or ListenOptions(uvicorn_log_level="warning"), port=free_port())
    server = uvicorn.Server(uvicorn_config(build_app(engine, config), listen))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    scheme = "https" if listen.ssl_certfile else "http"
    return SimpleNamespace(url=f"{scheme}://{listen.host}:{listen.port}", engine=engine, server=server, thread=thread)


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


def checkpoint_with_tokenizer(folder: Path, tokenizer, **tokenizer_config) -> Path:
    """The tiny model's checkpoint with a tokenizer the test built (a tokenizers.Tokenizer)."""
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(materialize(MODEL) / name, folder / name)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer_config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
