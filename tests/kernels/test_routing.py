"""Routing kernels against select_experts, on fresh random logits and on exact ties."""

import pytest
import torch

from moeserve.config import MoEConfig
from moeserve.kernels.routing import grouped_topk, softmax_topk
from moeserve.layers.moe.router import select_experts


def by_expert(ids, weights):
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.gather(1, order)


@pytest.mark.parametrize("num_experts,top_k,renormalize", [(8, 2, True), (60, 4, False), (64, 6, False), (128, 8, True)])
def test_softmax_topk_matches_reference(num_experts, top_k, renormalize):
    logits = torch.randn(37, num_experts) * 2
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, intermediate_size=1, scoring="softmax",
                    renormalize=renormalize, scaling_factor=1.5)
    ids, weights = softmax_topk(logits, top_k, renormalize, 1.5)
    ref_ids, ref_weights = select_experts(logits, moe)
    assert torch.equal(ids, ref_ids)  # same order too: best first
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_experts,groups,topk_groups,top_k", [(16, 4, 2, 4), (64, 8, 4, 8), (256, 8, 4, 8)])
def test_grouped_topk_matches_reference(num_experts, groups, topk_groups, top_k):
    logits = torch.randn(29, num_experts) * 2
    bias = torch.randn(num_experts) * 0.1
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, intermediate_size=1, scoring="sigmoid", renormalize=True,
                    scaling_factor=2.5, num_groups=groups, topk_groups=topk_groups, group_score="top2_sum",
                    correction_bias=True)
    ids, weights = grouped_topk(logits, bias, moe)
    ref_ids, ref_weights = select_experts(logits, moe, bias)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)


def test_ties_go_to_the_lowest_expert_in_kernel_and_reference():
    logits = torch.zeros(3, 16)
    logits[1, [3, 9, 12]] = 1.0  # three equal best experts
    moe = MoEConfig(num_experts=16, top_k=2, intermediate_size=1, scoring="softmax", renormalize=True)
    ids, _ = softmax_topk(logits, 2, True)
    ref_ids, _ = select_experts(logits, moe)
    assert ids.tolist() == ref_ids.tolist() == [[0, 1], [3, 9], [0, 1]]
    grouped = MoEConfig(num_experts=16, top_k=4, intermediate_size=1, scoring="sigmoid", renormalize=True,
                        num_groups=4, topk_groups=2, group_score="top2_sum", correction_bias=True)
    zero_bias = torch.zeros(16)
    assert torch.equal(grouped_topk(logits, zero_bias, grouped)[0], select_experts(logits, grouped, zero_bias)[0])


def test_no_tokens():
    ids, weights = softmax_topk(torch.randn(0, 8), 2, True)
    assert ids.shape == (0, 2) and weights.shape == (0, 2)


def test_both_kernels_count_the_chosen_experts_onto_running_totals():
    logits = torch.randn(41, 64) * 2
    grouped = MoEConfig(num_experts=64, top_k=8, intermediate_size=1, scoring="sigmoid", renormalize=True,
                        num_groups=8, topk_groups=4, group_score="top2_sum", correction_bias=True)
    earlier = torch.randint(0, 100, (64,))
    for route in (lambda counts: softmax_topk(logits, 6, False, 1.0, counts),
                  lambda counts: grouped_topk(logits, torch.randn(64) * 0.1, grouped, counts)):
        counts = earlier.clone()
        ids, _ = route(counts)
        assert torch.equal(counts, earlier + torch.bincount(ids.flatten(), minlength=64))


@pytest.mark.parametrize("real", [0, 17, 41])
def test_only_the_real_tokens_of_a_padded_batch_are_counted(real):
    """real_tokens (int32 [1], on the device): the first `real` tokens count, the padding rows after them do not
    (a captured decode batch); the kernels and the reference route alike."""
    from moeserve.layers.moe.router import Router
    from moeserve.ops.moe import moe_route

    logits = torch.randn(41, 64) * 2
    grouped = MoEConfig(num_experts=64, top_k=8, intermediate_size=1, scoring="sigmoid", renormalize=True,
                        num_groups=8, topk_groups=4, group_score="top2_sum", correction_bias=True)
    bias = torch.randn(64) * 0.1
    real_tokens = torch.tensor([real], dtype=torch.int32)
    earlier = torch.randint(0, 100, (64,))
    router = Router(16, grouped)
    router.e_score_correction_bias.data = bias
    for route in (lambda counts: softmax_topk(logits, 6, False, 1.0, counts, real_tokens),
                  lambda counts: grouped_topk(logits, bias, grouped, counts, real_tokens),
                  lambda counts: moe_route(router, logits, counts, real_tokens)):  # the torch reference on the CPU
        counts = earlier.clone()
        ids, _ = route(counts)
        assert torch.equal(counts, earlier + torch.bincount(ids[:real].flatten(), minlength=64))
    with pytest.raises(ValueError, match="real_tokens must be one int32"):
        softmax_topk(logits, 6, False, 1.0, earlier.clone(), real_tokens.long())

