"""AsyncEngine: streaming, concurrency, abort on early exit, errors raised at once."""

import asyncio
import time

import pytest

from moeserve.config import EngineArgs
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
