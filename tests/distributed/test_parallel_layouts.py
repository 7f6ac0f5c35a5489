"""Every parallel layout computes what one rank computes (gloo, 2 and 4 spawned ranks)."""

import pytest
import torch

import moeserve
from moeserve.config import ConfigError
from moeserve.distributed.layout import ExpertMap, ParallelGroups, ParallelLayout
from moeserve.distributed.parallelize import ParallelOptions
from tests.distributed.harness import run_ranks

PRESETS = ("tiny-deepseek-v3", "tiny-qwen2-moe", "tiny-llama4", "tiny-mixtral")


def batch(seed: int) -> torch.Tensor:
    return torch.randint(3, 512, (2, 21), generator=torch.Generator().manual_seed(seed))


def logits_per_layout(rank, world, layouts, presets, formats, backend):
    """For each (layout, preset, format): this rank's logits on its DP rank's batch."""
    results = {}
    for tp, dp, ep in layouts:
        groups = ParallelGroups(ParallelLayout(tp, dp, ep), "cpu")
        for preset in presets:
            for fmt in formats:
                options = ParallelOptions(groups, dispatch_format=fmt, backend=backend)
                model = moeserve.load_model(preset, parallel=options, progress=False)
                results[(tp, dp, ep, preset, fmt)] = model(batch(groups.dp_rank))
    return results


def single_rank_logits(preset: str, seed: int, fmt: str) -> torch.Tensor:
    """One rank; with a quantized dispatch format, the expert inputs pass through the same format."""
    from moeserve.distributed.ep.token_formats import token_format
    from moeserve.layers.moe.moe import MoE

    model = moeserve.load_model(preset, progress=False)
    if fmt != "bf16":
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            moe.dispatcher.token_format = token_format(fmt)
    return model(batch(seed))


def check(results: list, layouts, presets, formats):
    for (tp, dp, ep) in layouts:
        for preset in presets:
            for fmt in formats:
                for rank, result in enumerate(results):
                    dp_rank = ParallelLayout(tp, dp, ep).dp_index(rank)
                    expected = single_rank_logits(preset, dp_rank, fmt)
                    actual = result[(tp, dp, ep, preset, fmt)]
                    assert torch.isfinite(actual).all()
                    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4,
                                               msg=lambda m: f"tp={tp} dp={dp} ep={ep} {preset} {fmt} rank {rank}: {m}")


def test_two_rank_layouts_match_one_rank():
    layouts = [(2, 1, 1), (1, 2, 2), (2, 1, 2)]  # TP2 (experts split inside); DP2 x EP2; TP2 attention + EP2
    results = run_ranks(2, logits_per_layout, layouts, PRESETS, ("bf16",), "all_to_all")
    check(results, layouts, PRESETS, ("bf16",))


def test_four_rank_layouts_match_one_rank():
    layouts = [(1, 4, 4), (2, 2, 4), (2, 2, 2), (1, 4, 2)]  # EP4; TP2-attn + EP4; two EP2 groups; DP4 x EP2
    presets = ("tiny-deepseek-v3", "tiny-qwen3-moe")
    results = run_ranks(4, logits_per_layout, layouts, presets, ("bf16",), "all_to_all")
    check(results, layouts, presets, ("bf16",))


@pytest.mark.parametrize("backend", ["all_to_all", "allgather"])
def test_quantized_dispatch_matches_one_rank_with_the_same_quantization(backend):
    layouts = [(1, 2, 2)]
    formats = ("bf16", "fp8", "nvfp4")
    results = run_ranks(2, logits_per_layout, layouts, ("tiny-deepseek-v3",), formats, backend)
    check(results, layouts, ("tiny-deepseek-v3",), formats)


def test_layout_errors_are_clear():
    with pytest.raises(ConfigError, match=r"ep=3 must divide tp \* dp = 4"):
        ParallelLayout(tp=2, dp=2, ep=3)
    config = moeserve.load_config("tiny-qwen2-moe")  # 12 experts
    with pytest.raises(ConfigError, match="12 experts cannot be split evenly over ep=8 ranks"):
        ParallelLayout(dp=8, ep=8).check_model(config)
    with pytest.raises(ConfigError, match="2 KV heads cannot be split over tp=4"):
        ParallelLayout(tp=4).check_model(config)


def test_expert_map_is_explicit():
    expert_map = ExpertMap.contiguous(8, 4)
    assert expert_map.local_experts(2) == [4, 5] and expert_map.slots_per_rank == 2
    moved = ExpertMap(logical_of_slot=(1, 0), num_ranks=2)
    assert moved.local_experts(0) == [1] and moved.local_experts(1) == [0]
    redundant = ExpertMap(logical_of_slot=(0, 1, 2, 0, 3, 1), num_ranks=2)  # experts 0 and 1 on both ranks
    assert redundant.replicas() == [[0, 3], [1, 5], [2], [4]]
    table, counts = redundant.tensors("cpu")
    assert table.tolist() == [[0, 3], [1, 5], [2, -1], [4, -1]] and counts.tolist() == [2, 2, 1, 1]
    with pytest.raises(ConfigError, match="EP rank 0 would hold two replicas of one expert"):
        ExpertMap(logical_of_slot=(0, 0, 1, 2), num_ranks=2)
    with pytest.raises(ConfigError, match="5 expert slots cannot be split evenly over 2 EP ranks"):
        ExpertMap(logical_of_slot=(0, 1, 2, 3, 0), num_ranks=2)


def moe_edge_cases(rank, world, backend):
    from moeserve.layers.moe.moe import MoE

    groups = ParallelGroups(ParallelLayout(1, world, world), "cpu")
    sharded = moeserve.load_model("tiny-deepseek-v3", parallel=ParallelOptions(groups, backend=backend), progress=False)
    full = moeserve.load_model("tiny-deepseek-v3", progress=False)
    ep_moe, moe = sharded.model.layers[1].mlp, full.model.layers[1].mlp
    assert isinstance(ep_moe, MoE) and ep_moe.experts.gate_up_proj.shape[0] == 16 // world
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(rank))
    cases = {"uneven": x[: 3 + 4 * rank], "empty on rank 1": x if rank == 0 else x[:0]}
    results = {name: (ep_moe(inputs), moe(inputs)) for name, inputs in cases.items()}
    for layer in (ep_moe, moe):  # every token's top-4 now sits in experts 0-3, all on EP rank 0
        layer.gate.e_score_correction_bias[:4] += 10.0
    results["all to rank 0"] = (ep_moe(x), moe(x))
    topk_ids, _ = moe.gate(x)
    assert (topk_ids < 4).all()
    return results


@pytest.mark.parametrize("backend", ["all_to_all", "allgather"])
def test_skewed_and_empty_routing(backend):
    for rank, results in enumerate(run_ranks(2, moe_edge_cases, backend)):
        for name, (actual, expected) in results.items():
            assert actual.shape == expected.shape, name
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}, rank {rank}: {m}")
