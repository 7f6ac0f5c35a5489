"""The start-up warm-up (on by default on CUDA): dummy requests leave nothing behind, and nothing served
afterwards differs from an engine that did not warm up."""

import logging

from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams

PROMPTS = [{"prompt_token_ids": [3, 1, 4, 1, 5, 9, 2, 6]}, {"prompt_token_ids": list(range(10, 31))}]


def outputs(llm: LLM, params: SamplingParams) -> list[tuple[str, list[int]]]:
    return [(o.request_id, o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]


def test_warm_up_leaves_a_fresh_engine(caplog):
    with caplog.at_level(logging.INFO, logger="moeserve.engine.engine"):
        warm = LLM("tiny-deepseek-v2-lite", warm_up=True, block_size=4, max_num_batched_tokens=64)
    assert "Warmed up prefill and decode" in caplog.text
    engine = warm.engine
    state = engine.state()
    assert not engine.has_unfinished_requests() and not engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert (state.running, state.waiting, state.num_preemptions, state.prefix_cache_queries, state.prefix_cache_hits) == (0,) * 5
    assert all(count == 0 for counts in engine.expert_load().values() for count in counts)
    cold = LLM("tiny-deepseek-v2-lite", warm_up=False, block_size=4, max_num_batched_tokens=64)
    for params in (SamplingParams(temperature=0.0, max_tokens=6), SamplingParams(temperature=1.0, max_tokens=6, seed=7)):
        assert outputs(warm, params) == outputs(cold, params)  # the same request ids and tokens
    assert engine.expert_load() == cold.engine.expert_load()


def test_warm_up_fits_a_short_max_model_len():
    llm = LLM("tiny-mixtral", warm_up=True, max_model_len=6)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    assert len(llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(max_tokens=3))[0].outputs[0].token_ids) == 3


def test_no_warm_up_where_no_dummy_request_fits():
    llm = LLM("tiny-mixtral", warm_up=True, max_model_len=3)
    assert llm.generate([{"prompt_token_ids": [1]}], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_warm_up_prefills_every_size_up_to_a_full_step(monkeypatch):
    """Block configurations are tuned per row count: the warm-up's lone prefills of 32, 64, ... tokens up
    to a step's budget meet each size bucket (a bucket first met while serving compiles for seconds)."""
    from moeserve.engine.model_runner import ModelRunner

    step_tokens = []
    execute = ModelRunner.execute

    def recording(self, scheduled):
        step_tokens.append(sum(n for _, n in scheduled))
        return execute(self, scheduled)

    monkeypatch.setattr(ModelRunner, "execute", recording)
    LLM("tiny-qwen3-moe", warm_up=True, max_num_batched_tokens=1100, max_model_len=2048)  # prompts past the vocab
    for size in (32, 64, 128, 256, 512, 1024):
        assert size in step_tokens
    assert max(step_tokens) <= 1100
    step_tokens.clear()
    LLM("tiny-qwen3-moe", warm_up=True, max_num_batched_tokens=1024, max_model_len=200)  # steps of several prompts
    for size in (32, 64, 128, 256, 512, 1024):
        assert size in step_tokens
