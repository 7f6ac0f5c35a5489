"""Async scheduling (one step in flight, the next one launched before the last one's ids are read) gives what
the synchronous loop gives: every streamed output of every request, token for token and text for text."""

import asyncio
import contextlib

import pytest
import torch

from moeserve.engine.args import EngineArgs
from moeserve.engine.async_engine import AsyncEngine
from moeserve.engine.kv_cache import bytes_per_block
from moeserve.llm import LLM
from moeserve.loader.model_loader import load_config
from moeserve.sampling_params import SamplingParams

PRESET = "tiny-qwen3-moe"
PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 97 + 1 for j in range(n)]} for i, n in enumerate((3, 17, 40, 9, 26))]


@pytest.fixture(scope="module")
def engines():
    """(synchronous, async) engines alike but for the loop."""
    return tuple(LLM(PRESET, block_size=4, async_scheduling=on).engine for on in (False, True))


def run_events(engine, events):
    """events: per step, the (prompt, params, request id) to add before it; every request's outputs in order."""
    events = [list(e) for e in events]
    streams: dict[str, list] = {}
    while events or engine.has_unfinished_requests():
        for prompt, params, request_id in events.pop(0) if events else []:
            engine.add_request(prompt, params, request_id)
        for output in engine.step():
            streams.setdefault(output.request_id, []).append(summary(output))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return streams


def summary(output):
    return (output.finished, output.prompt_logprobs,
            [(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs, c.cumulative_logprob) for c in output.outputs])


def same_in_both(engines, events):
    sync, overlapped = (run_events(engine, events) for engine in engines)
    assert overlapped == sync
    return sync


def final_tokens(streams, request_id, index=0):
    return streams[request_id][-1][2][index][0]


def test_async_is_on_for_the_flag_and_off_by_default_on_cpu(engines):
    assert [engine.async_scheduling for engine in engines] == [False, True]
    assert not LLM(PRESET).engine.async_scheduling


def test_greedy_as_the_batch_shrinks_and_grows(engines):
    lengths = (5, 12, 20, 8, 16)
    add = lambda indices: [(PROMPTS[i], SamplingParams(temperature=0, max_tokens=lengths[i], ignore_eos=True), str(i))
                           for i in indices]
    streams = same_in_both(engines, [add((0, 1, 2)), [], [], [], add((3,)), [], add((4,))])
    assert [len(final_tokens(streams, str(i))) for i in range(5)] == list(lengths)


def test_seeded_sampling_with_truncation_and_penalties(engines):
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=12),
              SamplingParams(temperature=0.8, top_k=20, min_p=0.05, seed=12, max_tokens=9),
              SamplingParams(temperature=1.0, seed=13, repetition_penalty=1.3, frequency_penalty=0.4, max_tokens=14),
              SamplingParams(temperature=0, presence_penalty=0.7, repetition_penalty=0.8, max_tokens=10),
              SamplingParams(temperature=0.7, seed=14, min_tokens=6, logit_bias={5: 3.0}, max_tokens=11)]
    same_in_both(engines, [[(p, sp, str(i)) for i, (p, sp) in enumerate(zip(PROMPTS, params))]])


def test_n_completions_logprobs_and_prompt_logprobs(engines):
    params = [SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=7, logprobs=2),
              SamplingParams(temperature=0, max_tokens=6, logprobs=0, prompt_logprobs=2),
              SamplingParams(n=2, temperature=0, max_tokens=5, ignore_eos=True)]
    streams = same_in_both(engines, [[(PROMPTS[i], params[i], str(i)) for i in range(3)]])
    assert len(streams["0"][-1][2]) == 3 and streams["1"][-1][1] is not None


def test_stop_tokens_and_strings_end_rows_the_next_step_already_computed(engines):
    sync = engines[0]
    free_run = run_events(sync, [[("Hello", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), "free")]])
    tokens, text = final_tokens(free_run, "free"), free_run["free"][-1][2][0][1]
    stop_string = text[len(text) // 2 : len(text) // 2 + 2]
    events = [[("Hello", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[tokens[5]]), "token"),
               ("Hello", SamplingParams(temperature=1.0, seed=2, max_tokens=16, frequency_penalty=0.5,
                                        stop_token_ids=[tokens[5]]), "penalised"),
               ("Hello", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop_string]), "string"),
               ("Hello", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop_string],
                                        include_stop_str_in_output=True, min_tokens=3), "kept"),
               ("Hello", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), "long")]]
    streams = same_in_both(engines, events)
    assert streams["token"][-1][2][0][2:4] == ("stop", tokens[5])
    assert streams["string"][-1][2][0][2:4] == ("stop", stop_string)


@contextlib.contextmanager
def eos_token(engines, token):
    saved = [(engine.eos_token_ids, engine.runner.eos_token_ids) for engine in engines]
    for engine in engines:
        engine.eos_token_ids = engine.runner.eos_token_ids = (token,)
    try:
        yield
    finally:
        for engine, (own, runner) in zip(engines, saved):
            engine.eos_token_ids, engine.runner.eos_token_ids = own, runner


def test_eos_and_max_tokens(engines):
    free_run = run_events(engines[0], [[(PROMPTS[1], SamplingParams(temperature=0, max_tokens=10), "free")]])
    eos = final_tokens(free_run, "free")[4]
    with eos_token(engines, eos):
        events = [[(PROMPTS[1], SamplingParams(temperature=0, max_tokens=10), "eos"),
                   (PROMPTS[1], SamplingParams(temperature=0, max_tokens=10, min_tokens=7), "late"),
                   (PROMPTS[1], SamplingParams(temperature=0, max_tokens=3), "short"),
                   (PROMPTS[2], SamplingParams(temperature=1.0, seed=3, max_tokens=1), "one")]]
        streams = same_in_both(engines, events)
    assert streams["eos"][-1][2][0][2] == "stop" and final_tokens(streams, "eos")[-1] == eos
    assert streams["short"][-1][2][0][2] == "length" and len(final_tokens(streams, "short")) == 3


def test_chunked_prefill_mixed_with_decodes():
    engines = tuple(LLM(PRESET, block_size=4, max_num_batched_tokens=7, async_scheduling=on).engine for on in (False, True))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=1)
    same_in_both(engines, [[(PROMPTS[0], params, "0")], [(PROMPTS[2], params, "2")], [], [(PROMPTS[4], params, "4")]])


def test_preemption_under_a_small_cache():
    config = load_config(PRESET)
    memory = 20 * bytes_per_block(config, 4, torch.float32)  # 80 tokens: the five requests need 160
    engines = tuple(LLM(PRESET, block_size=4, dtype="float32", max_model_len=64, kv_cache_memory=memory,
                        async_scheduling=on).engine for on in (False, True))
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True, repetition_penalty=1.2)]
    streams = same_in_both(engines, [[(p, params[i % 2], str(i)) for i, p in enumerate(PROMPTS)]])
    assert all(engine.scheduler.num_preemptions > 0 for engine in engines)
    assert all(len(final_tokens(streams, str(i))) == 20 for i in range(5))


def test_the_step_in_flight_holds_pending_tokens_read_on_the_next_call(engines):
    engine = engines[1]
    engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), "pending")
    seq = engine.requests["pending"].seqs[0]
    assert engine.step() == []  # the prefill is launched; nothing is read yet
    assert seq.num_pending_tokens == 1 and seq.token_ids == PROMPTS[0]["prompt_token_ids"]
    outputs = engine.step()  # launches the first decode (its input taken on the device), reads the prefill's token
    assert len(outputs[0].outputs[0].token_ids) == 1 and seq.num_pending_tokens == 1
    while engine.has_unfinished_requests():
        engine.step()
    assert len(seq.output_token_ids) == 4


def test_a_sequence_whose_pending_token_is_its_last_is_not_scheduled_again(engines):
    engine = engines[1]
    engine.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), "two")
    engine.step(), engine.step()  # the prefill, then the decode of the second token (the first one pending)
    assert engine.scheduler.schedule() == []
    output = engine.step()[0]  # launches nothing, reads the last token
    assert output.finished and len(output.outputs[0].token_ids) == 2 and engine.in_flight is None


def test_abort_while_a_step_is_in_flight_loses_and_repeats_nothing(engines):
    sync, overlapped = engines
    params = SamplingParams(temperature=1.0, seed=21, max_tokens=30, ignore_eos=True)
    expected = final_tokens(run_events(sync, [[(PROMPTS[3], params, "ref")]]), "ref")
    overlapped.add_request(PROMPTS[3], params, "gone")
    overlapped.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), "stays")
    seen = []
    for _ in range(5):
        seen += [o.outputs[0].token_ids for o in overlapped.step() if o.request_id == "gone"]
    aborted = overlapped.abort("gone")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert aborted.outputs[0].token_ids == seen[-1] == expected[: len(seen[-1])]  # the in-flight token is dropped
    later = []
    while overlapped.has_unfinished_requests():
        later += [o.request_id for o in overlapped.step()]
    assert "gone" not in later and "stays" in later
    assert overlapped.block_manager.num_free_blocks == overlapped.block_manager.num_blocks
    again = run_events(overlapped, [[(PROMPTS[3], params, "gone")]])  # the id is free again
    assert final_tokens(again, "gone") == expected


def test_the_async_engine_streams_what_the_synchronous_loop_streams(engines):
    params = SamplingParams(temperature=1.0, seed=4, max_tokens=9, stop_token_ids=[7])
    expected = run_events(engines[0], [[(PROMPTS[2], params, "s")]])["s"]
    server = AsyncEngine.from_args(EngineArgs(model=PRESET, block_size=4, async_scheduling=True))

    async def stream():
        return [summary(output) async for output in server.generate(PROMPTS[2], params, "s")]

    try:
        assert server.engine.async_scheduling and asyncio.run(stream()) == expected
    finally:
        server.shutdown()
