"""Each routing rule against a small example computed by hand."""

import math

import torch

from moeserve.config import MoEConfig
from moeserve.layers.moe.router import select_experts


def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


def routed(logits, moe, bias=None):
    ids, weights = select_experts(torch.tensor([logits]), moe, None if bias is None else torch.tensor(bias))
    order = ids[0].argsort()
    return ids[0][order].tolist(), weights[0][order].tolist()


def test_softmax_top2_renormalised_mixtral():
    moe = MoEConfig(num_experts=4, top_k=2, intermediate_size=1, scoring="softmax", renormalize=True)
    ids, weights = routed([1.0, 3.0, 0.0, 2.0], moe)
    assert ids == [1, 3]
    e1, e3 = math.exp(3.0), math.exp(2.0)
    assert torch.allclose(torch.tensor(weights), torch.tensor([e1 / (e1 + e3), e3 / (e1 + e3)]))


def test_softmax_topk_without_renormalisation_qwen2():
    moe = MoEConfig(num_experts=4, top_k=2, intermediate_size=1, scoring="softmax", renormalize=False)
    ids, weights = routed([1.0, 3.0, 0.0, 2.0], moe)
    p = softmax([1.0, 3.0, 0.0, 2.0])
    assert ids == [1, 3]
    assert torch.allclose(torch.tensor(weights), torch.tensor([p[1], p[3]]))


def test_group_limited_greedy_deepseek_v2_scores_groups_by_max():
    # groups {0,1} {2,3} {4,5} have maxima 1.0, 2.0, 1.9 -> groups 1 and 2 are kept, although expert 0 (1.0)
    # beats expert 5 (0.5)
    logits = [1.0, 0.9, 2.0, -3.0, 1.9, 0.5]
    moe = MoEConfig(num_experts=6, top_k=3, intermediate_size=1, scoring="softmax", renormalize=False,
                    scaling_factor=16.0, num_groups=3, topk_groups=2, group_score="max")
    ids, weights = routed(logits, moe)
    p = softmax(logits)
    assert ids == [2, 4, 5]
    assert torch.allclose(torch.tensor(weights), 16.0 * torch.tensor([p[2], p[4], p[5]]))


def test_noaux_tc_deepseek_v3_bias_selects_and_groups_by_top2_sum():
    # 8 experts in 4 groups of 2; the bias lifts expert 7 into the choice but not into its weight.
    logits = [2.0, -2.0, 1.0, 1.0, 0.5, 0.4, -1.0, 0.0]
    bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]
    s = [sigmoid(v) for v in logits]
    choice = [a + b for a, b in zip(s, bias)]
    # group sums of top-2: g0 = s0+s1, g1 = s2+s3, g2 = s4+s5, g3 = s6+s7+2 -> best two: g3, g1
    assert sorted(range(4), key=lambda g: -(choice[2 * g] + choice[2 * g + 1]))[:2] == [3, 1]
    moe = MoEConfig(num_experts=8, top_k=3, intermediate_size=1, scoring="sigmoid", renormalize=True,
                    scaling_factor=2.5, num_groups=4, topk_groups=2, group_score="top2_sum", correction_bias=True)
    ids, weights = routed(logits, moe, bias)
    assert ids == [2, 3, 7]  # expert 0 has the highest score but its group lost
    chosen = [s[2], s[3], s[7]]
    expected = [2.5 * w / sum(chosen) for w in chosen]
    assert torch.allclose(torch.tensor(weights), torch.tensor(expected))


def test_sigmoid_top1_llama4():
    moe = MoEConfig(num_experts=4, top_k=1, intermediate_size=1, scoring="sigmoid", renormalize=False,
                    weights_on_input=True)
    ids, weights = routed([0.3, -1.0, 2.5, 2.4], moe)
    assert ids == [2]
    assert torch.allclose(torch.tensor(weights), torch.tensor([sigmoid(2.5)]))
