"""The runner's decode-graph body on the CPU: a batch padded to a graph's size computes the same logits for
its real rows as the eager step, the padding rows write only the padding block, and only the real rows count in
the expert load."""

import pytest
import torch

from moeserve.config import ConfigError
from moeserve.engine.args import EngineArgs
from moeserve.engine.cuda_graphs import DecodeGraphs, graph_sizes
from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams


def test_default_graph_sizes_follow_vllm():
    assert graph_sizes(EngineArgs(model="m", max_num_seqs=128)) == [1, 2, 4] + list(range(8, 129, 8))
    assert graph_sizes(EngineArgs(model="m", max_num_seqs=20)) == [1, 2, 4, 8, 16, 20]
    assert graph_sizes(EngineArgs(model="m", max_num_seqs=64, max_num_batched_tokens=12)) == [1, 2, 4, 8, 12]
    assert graph_sizes(EngineArgs(model="m", cuda_graph_sizes=[6, 2, 6])) == [2, 6]


@pytest.mark.parametrize("sizes", [[0], [], [129], [2.5]])
def test_graph_sizes_are_checked(sizes):
    with pytest.raises(ConfigError, match="cuda_graph_sizes"):
        EngineArgs(model="m", cuda_graph_sizes=sizes)


def test_size_for_picks_the_next_captured_size():
    graphs = DecodeGraphs([1, 2, 4, 8])
    assert [graphs.size_for(b) for b in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2-lite", "tiny-qwen3-moe"])
def test_padded_decode_batch_matches_the_eager_step(preset):
    engine = LLM(preset, device="cpu", dtype="float32", max_model_len=256).engine
    for i, n in enumerate((5, 19, 33)):
        engine.add_request({"prompt_token_ids": [(3 * i + j) % 50 + 1 for j in range(n)]},
                           SamplingParams(temperature=0, max_tokens=8))
    engine.step()  # the prefills
    runner = engine.runner
    scheduled = sorted(engine.scheduler.schedule(), key=lambda item: item[0].block_row)
    assert [n for _, n in scheduled] == [1, 1, 1] and runner.decodes_only(scheduled)
    caches = [cache.clone() for cache in runner.attention.kv_caches]
    load = runner.expert_load()
    runner.send(scheduled, pad_to=8)
    padded = runner.graph_forward(8)[:3]
    top_k = engine.config.moe.top_k
    assert {i: sum(c) - sum(load[i]) for i, c in runner.expert_load().items()} == dict.fromkeys(load, 3 * top_k)
    padded_caches = [cache.clone() for cache in runner.attention.kv_caches]
    for cache, before in zip(runner.attention.kv_caches, caches):
        cache.copy_(before)
    runner.send(scheduled)
    ids, positions, metadata = runner.device_batch(3, [1, 1, 1], [s.num_computed_tokens + 1 for s, _ in scheduled])
    eager = runner.model.compute_logits(runner.model.model(ids, positions, runner.attention.bind(metadata)))
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(padded).all()
    assert {i: sum(c) - sum(load[i]) for i, c in runner.expert_load().items()} == dict.fromkeys(load, 6 * top_k)
    load = runner.expert_load()
    runner.send_padding(4)  # a rank with no work replays a graph over padding rows only: nothing is counted
    runner.graph_forward(4)
    assert runner.expert_load() == load
    real_slots = sorted(seq.block_table[seq.num_computed_tokens // 16] * 16 + seq.num_computed_tokens % 16
                        for seq, _ in scheduled)
    for padded_cache, eager_cache, before in zip(padded_caches, runner.attention.kv_caches, caches):
        slots = lambda cache: cache.flatten(0, 1) if cache.dim() == 3 else cache.flatten(1, 2).transpose(0, 1)
        changed = (slots(padded_cache) != slots(before)).flatten(1).any(-1).nonzero().flatten().tolist()
        padding_block = range(runner.num_blocks * 16, (runner.num_blocks + 1) * 16)
        assert [s for s in changed if s not in padding_block] == real_slots
        assert any(s in padding_block for s in changed)
        torch.testing.assert_close(slots(padded_cache)[real_slots], slots(eager_cache)[real_slots])
