"""Async scheduling on CUDA with decode graphs (the default) gives what the synchronous loop gives: greedy and
seeded tokens, penalties, stop tokens that leave a computed row to drop, preemption; abort in flight."""

import pytest
import torch

from moeserve.engine.kv_cache import bytes_per_block
from moeserve.llm import LLM
from moeserve.loader.model_loader import load_config
from moeserve.sampling_params import SamplingParams
from tests.engine.test_async_scheduling import run_events

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 97 + 1 for j in range(n)]} for i, n in enumerate((3, 17, 40, 9, 70))]


def engines(preset, **args):
    """(synchronous, async) engines on CUDA with graphs, alike but for the loop."""
    args = dict(device="cuda", kv_cache_memory=2**26, **args)
    return tuple(LLM(preset, async_scheduling=on, **args).engine for on in (False, True))


def same_in_both(pair, events):
    sync, overlapped = (run_events(engine, events) for engine in pair)
    assert all(engine.runner.graphs is not None and engine.runner.graphs.replays > 0 for engine in pair)
    assert overlapped == sync
    return sync


def test_async_with_graphs_is_the_default_on_cuda():
    engine = LLM("tiny-qwen3-moe", device="cuda", kv_cache_memory=2**26).engine
    assert engine.async_scheduling and engine.runner.graphs is not None


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2-lite", "tiny-qwen3-moe", "tiny-mixtral"])
def test_greedy_as_the_batch_shrinks_and_grows(preset):
    lengths = (5, 12, 20, 8, 16)
    add = lambda indices: [(PROMPTS[i], SamplingParams(temperature=0, max_tokens=lengths[i], ignore_eos=True), str(i))
                           for i in indices]
    streams = same_in_both(engines(preset), [add((0, 1, 2)), [], [], [], add((3, 4))])
    assert [len(streams[str(i)][-1][2][0][0]) for i in range(5)] == list(lengths)


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2-lite", "tiny-qwen3-moe"])
def test_seeded_sampling_penalties_and_stop_tokens(preset):
    pair = engines(preset)
    free_run = run_events(pair[0], [[(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), "f")]])
    stop = free_run["f"][-1][2][0][0][6]
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=12),
              SamplingParams(temperature=0.8, top_k=20, seed=12, repetition_penalty=1.3, max_tokens=15),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop]),
              SamplingParams(n=2, temperature=1.0, seed=13, frequency_penalty=0.5, max_tokens=10, logprobs=1),
              SamplingParams(temperature=0, presence_penalty=0.6, max_tokens=9, ignore_eos=True)]
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3], PROMPTS[4]]
    streams = same_in_both(pair, [[(p, sp, str(i)) for i, (p, sp) in enumerate(zip(prompts, params))]])
    assert streams["2"][-1][2][0][2:4] == ("stop", stop)


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2-lite", "tiny-mixtral"])
def test_preemption_then_abort_in_flight(preset):
    config = load_config(preset)
    block_size = 64 if config.mla is not None else 16
    num_blocks = {64: 5, 16: 17}[block_size]  # holds max_model_len (256), not the five requests
    memory = num_blocks * bytes_per_block(config, block_size, torch.float32)
    pair = tuple(LLM(preset, device="cuda", dtype="float32", max_model_len=256, block_size=block_size,
                     kv_cache_memory=memory, async_scheduling=on).engine for on in (False, True))
    greedy = SamplingParams(temperature=0, max_tokens=70, ignore_eos=True)  # each needs 2 or 3 blocks of 64 (5 of 16)
    streams = same_in_both(pair, [[(p, greedy, str(i)) for i, p in enumerate(PROMPTS)]])
    assert all(engine.scheduler.num_preemptions > 0 for engine in pair)
    overlapped = pair[1]
    overlapped.add_request(PROMPTS[1], greedy, "gone")
    seen = []
    for _ in range(6):
        seen += [o.outputs[0].token_ids for o in overlapped.step()]
    aborted = overlapped.abort("gone").outputs[0]
    assert aborted.finish_reason == "abort" and aborted.token_ids == seen[-1] == streams["1"][-1][2][0][0][: len(seen[-1])]
    while overlapped.has_unfinished_requests():
        assert overlapped.step() == []
    assert overlapped.block_manager.num_free_blocks == overlapped.block_manager.num_blocks
