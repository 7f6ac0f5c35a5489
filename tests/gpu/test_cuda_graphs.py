"""Decode under CUDA graphs gives what eager decode gives: greedy and seeded tokens, batches padded to a
captured size, batches that shrink and grow, preemption and abort."""

import pytest
import torch

from moeserve.engine.kv_cache import bytes_per_block
from moeserve.llm import LLM
from moeserve.loader import presets
from moeserve.loader.model_loader import load_config
from moeserve.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 97 + 1 for j in range(n)]} for i, n in enumerate((3, 17, 40, 9, 70))]


def engine(preset, enforce_eager, **args):
    return LLM(preset, device="cuda", kv_cache_memory=2**26, enforce_eager=enforce_eager, **args).engine


def run_events(engine, events):
    """events: per step, the (prompt, params) to add before it, or ("abort", id); tokens per request id."""
    tokens, step = {}, 0
    while events or engine.has_unfinished_requests():
        for event in events.pop(0) if events else []:
            if event[0] == "abort":
                engine.abort(event[1])
            else:
                engine.add_request(*event)
        for output in engine.step():
            tokens[output.request_id] = output.outputs[0].token_ids
        step += 1
    return tokens


def both(preset, events, **args):
    graphs, eager = engine(preset, False, **args), engine(preset, True, **args)
    result = run_events(graphs, [list(e) for e in events]), run_events(eager, [list(e) for e in events])
    assert graphs.runner.graphs is not None and graphs.runner.graphs.replays > 0
    assert eager.runner.graphs is None
    assert graphs.block_manager.num_free_blocks == graphs.block_manager.num_blocks
    return result


@pytest.mark.parametrize("preset", sorted(presets.TINY_PRESETS))
def test_graph_decode_equals_eager_as_the_batch_shrinks_and_grows(preset):
    lengths = (5, 12, 20, 8, 16)  # sequences finish at different steps: the padded size changes
    first = [(PROMPTS[i], SamplingParams(temperature=0, max_tokens=lengths[i], ignore_eos=True), str(i)) for i in range(3)]
    later = [(PROMPTS[i], SamplingParams(temperature=0, max_tokens=lengths[i], ignore_eos=True), str(i)) for i in (3, 4)]
    graphs, eager = both(preset, [first, [], [], [], later])
    assert graphs == eager and len(graphs) == 5


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2-lite", "tiny-qwen3-moe"])
def test_the_expert_load_counts_the_same_tokens_with_and_without_graphs(preset):
    """Three sequences decode in batches padded to 4: the padding rows route too, but only real tokens count."""
    events = [[(PROMPTS[i], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), str(i)) for i in range(3)]]
    graphs, eager = engine(preset, False), engine(preset, True)
    loads = []
    for e in (graphs, eager):
        e.runner.reset_expert_load()
        run_events(e, [list(x) for x in events])
        loads.append(e.expert_load())
    assert graphs.runner.graphs.replays > 0
    tokens = sum(len(PROMPTS[i]["prompt_token_ids"]) + 5 for i in range(3))  # each prompt, then 5 decodes
    top_k = graphs.config.moe.top_k
    for load in loads:  # (which experts may differ at near-ties: the padded batch's sums are not bitwise eager's)
        assert load and all(sum(counts) == tokens * top_k for counts in load.values())


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2-lite", "tiny-qwen3-moe"])
def test_seeded_sampling_is_the_same_with_and_without_graphs(preset):
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=11 + i, max_tokens=12) for i in range(5)]
    graphs, eager = both(preset, [[(p, sp, str(i)) for i, (p, sp) in enumerate(zip(PROMPTS, params))]])
    assert graphs == eager


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2-lite", "tiny-mixtral"])
def test_preemption_and_abort_under_graphs(preset):
    config = load_config(preset)
    block_size = 64 if config.mla is not None else 16
    num_blocks = {64: 5, 16: 17}[block_size]  # holds max_model_len (256), not the five requests (7 and 23 blocks)
    memory = num_blocks * bytes_per_block(config, block_size, torch.float32)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    events = [[(p, greedy, str(i)) for i, p in enumerate(PROMPTS)], [], [], [("abort", "1")]]
    args = dict(dtype="float32", max_model_len=256, block_size=block_size)
    graphs_engine, eager_engine = (LLM(preset, device="cuda", kv_cache_memory=memory, enforce_eager=e, **args).engine
                                   for e in (False, True))
    graphs = run_events(graphs_engine, [list(e) for e in events])
    eager = run_events(eager_engine, [list(e) for e in events])
    assert graphs_engine.scheduler.num_preemptions > 0 and graphs_engine.runner.graphs.replays > 0
    assert graphs == eager and len(graphs["1"]) < 40 and all(len(graphs[str(i)]) == 40 for i in (0, 2, 3, 4))


def test_capture_logs_and_honours_sizes(caplog):
    caplog.set_level("INFO")
    llm = LLM("tiny-qwen3-moe", device="cuda", kv_cache_memory=2**26, cuda_graph_sizes=[2, 6], max_num_seqs=8)
    assert llm.engine.runner.graphs.sizes == [2, 6]
    assert any("Captured 2 decode CUDA graphs" in r.message for r in caplog.records)
    prompts = PROMPTS[:4] + PROMPTS[:3]  # 7 decodes: more than the largest graph, eager
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 4 for o in outputs)
