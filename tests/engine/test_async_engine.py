"""AsyncEngine: streaming, concurrency, abort on early exit, errors raised at once."""

import asyncio
import threading
import time

import pytest

from moeserve.engine.args import EngineArgs
from moeserve.engine.async_engine import AsyncEngine
from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams, SamplingParamsError

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    engine = AsyncEngine.from_args(EngineArgs(model="tiny-mixtral"))
    yield engine
    engine.shutdown()


async def collect(engine, prompt, params, request_id):
    return [output async for output in engine.generate(prompt, params, request_id)]


def test_stream_grows_to_the_offline_result(engine):
    outputs = asyncio.run(collect(engine, {"prompt_token_ids": [4, 5, 6]}, GREEDY, "stream"))
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    assert lengths == sorted(lengths) and lengths[-1] == 10 and len(outputs) > 1
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    offline = LLM("tiny-mixtral").generate({"prompt_token_ids": [4, 5, 6]}, GREEDY)[0]
    assert outputs[-1].outputs[0].token_ids == offline.outputs[0].token_ids


def test_concurrent_requests_all_finish(engine):
    async def many():
        prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (2, 9, 4, 15)]
        return await asyncio.gather(*(collect(engine, p, GREEDY, f"c{i}") for i, p in enumerate(prompts)))

    for outputs in asyncio.run(many()):
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 10


def test_leaving_the_stream_early_aborts_and_frees_blocks(engine):
    async def read_two():
        stream = engine.generate({"prompt_token_ids": [7] * 20}, SamplingParams(max_tokens=500, ignore_eos=True), "early")
        async for output in stream:
            if len(output.outputs[0].token_ids) >= 2:
                break
        await stream.aclose()

    asyncio.run(read_two())
    manager = engine.engine.block_manager
    deadline = time.monotonic() + 10
    while (engine.engine.has_unfinished_requests() or manager.num_free_blocks < manager.num_blocks) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.engine.has_unfinished_requests()
    assert manager.num_free_blocks == manager.num_blocks


def test_bad_request_raises_before_anything_is_queued(engine):
    async def bad():
        async for _ in engine.generate({"prompt_token_ids": [1]}, SamplingParams(logit_bias={10**6: 1.0}), "bad"):
            pass

    with pytest.raises(SamplingParamsError, match="logit_bias: token id 1000000 is outside the vocabulary"):
        asyncio.run(bad())
    assert "bad" not in engine.streams


def test_a_request_still_tokenizing_when_the_engine_shuts_down_is_refused():
    engine = AsyncEngine.from_args(EngineArgs(model="tiny-mixtral"))
    entered, release = threading.Event(), threading.Event()
    make_request = engine.engine.make_request

    def slow_make_request(*args):
        entered.set()
        release.wait(30)
        return make_request(*args)

    engine.engine.make_request = slow_make_request

    async def shut_down_while_tokenizing():
        loop = asyncio.get_running_loop()
        adding = asyncio.ensure_future(engine.add_request("Hello", GREEDY, "late"))
        assert await loop.run_in_executor(None, entered.wait, 30)
        await loop.run_in_executor(None, engine.shutdown)
        release.set()
        await asyncio.wait_for(adding, 10)  # without the check: a stream that nothing would ever answer

    with pytest.raises(RuntimeError, match="the engine is shutting down"):
        asyncio.run(shut_down_while_tokenizing())
