"""Redundant experts and rebalancing in a running model (gloo ranks): logits and greedy tokens equal one rank's
under every placement, and the weights a rebalancing moves are the checkpoint's, bit for bit."""

import pytest
import torch

import moeserve
from moeserve.distributed.ep.rebalance import expert_dispatcher, expert_parallel_layers, rebalance
from moeserve.distributed.launch import make_context
from moeserve.distributed.layout import ParallelGroups, ParallelLayout
from moeserve.distributed.parallelize import ParallelOptions
from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams
from tests.distributed.harness import run_ranks

PRESET = "tiny-deepseek-v3"  # 16 experts, top-4


def tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(seed))


def slots_hold_the_checkpoints_experts(model, full) -> bool:
    """Every local slot's parameters equal, bit for bit, the single-rank model's expert it says it holds."""
    for moe, whole in zip(expert_parallel_layers(model), expert_parallel_layers_of(full)):
        local = expert_dispatcher(moe).expert_map.local_experts(expert_dispatcher(moe).ep_rank)
        for ours, theirs in zip(moe.experts.parameters(), whole.experts.parameters()):
            if not all(torch.equal(ours[slot], theirs[expert]) for slot, expert in enumerate(local)):
                return False
    return True


def expert_parallel_layers_of(full):
    from moeserve.layers.moe.moe import MoE

    return [m for m in full.modules() if isinstance(m, MoE)]


def rebalance_a_skewed_load(rank, world, quantization):
    groups = ParallelGroups(ParallelLayout(1, world, world), "cpu")
    options = ParallelOptions(groups, num_redundant_experts=2)
    model = moeserve.load_model(PRESET, progress=False, quantization=quantization, parallel=options)
    full = moeserve.load_model(PRESET, progress=False, quantization=quantization)
    layers = expert_parallel_layers(model)
    before = model(tokens(rank))
    initial = [expert_dispatcher(moe).expert_map for moe in layers]
    idle = rebalance(layers, torch.zeros(len(layers), 16), groups.ep_group, groups.ep_rank)
    stayed = idle.moved_experts == 0 and [expert_dispatcher(moe).expert_map for moe in layers] == initial
    load = torch.ones(len(layers), 16)
    load[:, 5] = 60.0  # half the tokens to one expert (the same trace on both ranks: they are summed)
    load[:, 0] = 20.0
    result = rebalance(layers, load, groups.ep_group, groups.ep_rank)
    moved = [expert_dispatcher(moe).expert_map for moe in layers]
    after = model(tokens(rank))
    return {"before": before, "after": after, "expected": full(tokens(rank)), "result": result,
            "changed": moved != initial, "bit_identical": slots_hold_the_checkpoints_experts(model, full),
            "replicas_of_hot": [len(m.replicas()[5]) for m in moved], "idle_window_moved_nothing": stayed}


@pytest.mark.parametrize("quantization", [None, "fp8", "nvfp4"])
def test_rebalancing_keeps_logits_and_moves_the_checkpoints_weights(quantization):
    for rank, out in enumerate(run_ranks(2, rebalance_a_skewed_load, quantization)):
        assert out["idle_window_moved_nothing"]
        assert out["changed"] and out["result"].moved_experts > 0
        assert out["bit_identical"]
        assert out["replicas_of_hot"] == [2] * len(out["replicas_of_hot"])  # the hot expert on both ranks
        assert max(out["result"].after) <= 1.15 < min(out["result"].before)
        for logits in (out["before"], out["after"]):
            assert torch.isfinite(logits).all()
            torch.testing.assert_close(logits, out["expected"], rtol=1e-4, atol=1e-4, msg=f"rank {rank}")


PROMPTS = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 19, 8)]


def params():
    return [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (24, 4, 6)]


def generate_with_rebalancing(rank, world):
    context = make_context(ParallelLayout(1, world, world), "cpu", 60)
    llm = LLM(PRESET, context=context, dp=world, ep=world, max_num_batched_tokens=16, num_redundant_experts=2,
              eplb_interval=3)
    outputs = llm.generate(PROMPTS, params())
    balancer = llm.engine.runner.balancer
    return [o.outputs[0].token_ids for o in outputs], balancer.forwards, balancer.moved_experts


def test_dp2_ep2_with_redundant_experts_and_rebalancing_greedy_equals_one_process():
    expected = [o.outputs[0].token_ids for o in LLM(PRESET, max_num_batched_tokens=16).generate(PROMPTS, params())]
    for token_ids, forwards, moved_experts in run_ranks(2, generate_with_rebalancing):
        assert token_ids == expected
        assert forwards >= 6 and moved_experts > 0  # rebalanced while generating, and experts did move


def test_redundant_experts_need_expert_parallelism():
    from moeserve.config import ConfigError
    from moeserve.engine.args import EngineArgs

    with pytest.raises(ConfigError, match="needs expert parallelism"):
        EngineArgs(model=PRESET, num_redundant_experts=2)
    with pytest.raises(ConfigError, match="must be a multiple of ep=2"):
        EngineArgs(model=PRESET, dp=2, ep=2, num_redundant_experts=3)


def test_a_hot_experts_tokens_spread_evenly_over_its_replicas():
    from moeserve.distributed.ep.dispatchers import AllToAllDispatcher
    from moeserve.distributed.layout import ExpertMap

    expert_map = ExpertMap(logical_of_slot=(0, 1, 2, 0, 3, 1), num_ranks=2)  # 0 and 1 on both ranks
    for ep_rank in (0, 1):
        dispatcher = AllToAllDispatcher(expert_map, None, ep_rank, "bf16", "cpu", torch.float32)
        ids = torch.tensor([[0, 2]] * 9 + [[3, 1]] * 9)
        rank, slot = dispatcher.place(ids)
        assert sorted(torch.bincount(rank[:9, 0], minlength=2).tolist()) == [4, 5]  # expert 0: both replicas
        assert (rank[:9, 1] == 0).all() and (slot[:9, 1] == 2).all()  # expert 2: only on rank 0, slot 2
        assert (rank[9:, 0] == 1).all() and (slot[9:, 0] == 1).all()  # expert 3: rank 1, slot 1
        chosen = slot[9:, 1][rank[9:, 1] == 0], slot[9:, 1][rank[9:, 1] == 1]
        assert (chosen[0] == 1).all() and (chosen[1] == 2).all() and min(len(c) for c in chosen) == 4
