"""Routing kernels: router logits [T, E] -> (topk_ids [T, K] int64, topk_weights [T, K] fp32), one
program per token. Reference: moeserve.layers.moe.router.select_experts (same ties: lowest index first).

`softmax_topk`: softmax over all experts, top-k, optional renormalisation (Mixtral, Qwen, V2-Lite).
`grouped_topk`: DeepSeek-V3 noaux_tc: sigmoid scores, the correction bias for choosing only, groups
ranked by the sum of their two best biased scores, top-k inside the best groups, renormalised, scaled.
"""

import torch
import triton
import triton.language as tl

from moeserve.config import MoEConfig


@triton.jit
def _softmax_topk_kernel(logits_ptr, ids_ptr, weights_ptr, counts_ptr, real_tokens_ptr, num_experts, stride_t,
                         TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, SCALE: tl.constexpr,
                         BLOCK_E: tl.constexpr, COUNT: tl.constexpr, LIMITED: tl.constexpr):
    token = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + token * stride_t + experts, mask=experts < num_experts, other=-float("inf")).to(tl.float32)
    probs = tl.exp(logits - tl.max(logits, axis=0))
    probs = probs / tl.sum(probs, axis=0)
    remaining = tl.where(experts < num_experts, probs, -1.0)
    total = 0.0
    for k in tl.static_range(TOP_K):
        best = tl.argmax(remaining, axis=0, tie_break_left=True)
        value = tl.max(remaining, axis=0)
        tl.store(ids_ptr + token * TOP_K + k, best.to(tl.int64))
        tl.store(weights_ptr + token * TOP_K + k, value)
        total += value
        remaining = tl.where(experts == best, -2.0, remaining)
    _count(counts_ptr, real_tokens_ptr, token, experts, remaining == -2.0, COUNT, LIMITED)
    _rescale(weights_ptr + token * TOP_K, total, TOP_K, RENORMALIZE, SCALE)


@triton.jit
def _count(counts_ptr, real_tokens_ptr, token, experts, chosen, COUNT: tl.constexpr, LIMITED: tl.constexpr):
    """One more token routed to each chosen expert (the MoE layer's running expert-load metric): one
    relaxed atomic per expert, all at once (acq_rel atomics one after another cost ~5 us per token). LIMITED: only
    the first real_tokens tokens count (the others pad a captured batch)."""
    if COUNT:
        if LIMITED:
            chosen = chosen & (token < tl.load(real_tokens_ptr))
        tl.atomic_add(counts_ptr + experts, chosen.to(tl.int64), mask=chosen, sem="relaxed")


@triton.jit
def _rescale(weights_ptr, total, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, SCALE: tl.constexpr):
    """Renormalise (+1e-20, as the references) and scale the K stored weights (K need not be a power of 2)."""
    factor = SCALE / (total + 1e-20) if RENORMALIZE else SCALE
    for k in tl.static_range(TOP_K):
        tl.store(weights_ptr + k, tl.load(weights_ptr + k) * factor)


@triton.jit
def _grouped_topk_kernel(logits_ptr, bias_ptr, ids_ptr, weights_ptr, counts_ptr, real_tokens_ptr, stride_t,
                         NUM_GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                         TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, SCALE: tl.constexpr, COUNT: tl.constexpr,
                         LIMITED: tl.constexpr):
    token = tl.program_id(0)
    groups = tl.arange(0, NUM_GROUPS)[:, None]
    members = tl.arange(0, GROUP_SIZE)[None, :]
    experts = groups * GROUP_SIZE + members  # [G, E/G]
    scores = tl.sigmoid(tl.load(logits_ptr + token * stride_t + experts).to(tl.float32))
    choice = scores + tl.load(bias_ptr + experts).to(tl.float32)
    # group score: the sum of its two best biased scores
    first = tl.max(choice, axis=1)
    first_at = tl.argmax(choice, axis=1, tie_break_left=True)
    second = tl.max(tl.where(members == first_at[:, None], -float("inf"), choice), axis=1)
    group_scores = first + second  # [G]
    group_ids = tl.arange(0, NUM_GROUPS)
    kept = tl.zeros([NUM_GROUPS], dtype=tl.int1)
    for _ in tl.static_range(TOPK_GROUPS):
        best = tl.argmax(group_scores, axis=0, tie_break_left=True)
        kept = kept | (group_ids == best)
        group_scores = tl.where(group_ids == best, -float("inf"), group_scores)
    remaining = tl.where(kept[:, None], choice, -float("inf"))
    chosen = tl.zeros([NUM_GROUPS, GROUP_SIZE], dtype=tl.int1)
    total = 0.0
    for k in tl.static_range(TOP_K):
        # the best expert: the best group first, then its best member (no reshape: on the GPU a reshaped
        # argmax does not map back to expert ids); ties go to the lowest group, then the lowest member
        group = tl.argmax(tl.max(remaining, axis=1), axis=0, tie_break_left=True)
        in_group = tl.where(groups == group, remaining, -float("inf"))
        member = tl.argmax(tl.max(in_group, axis=0), axis=0, tie_break_left=True)
        best = group * GROUP_SIZE + member
        picked = experts == best
        weight = tl.sum(tl.sum(tl.where(picked, scores, 0.0), axis=1), axis=0)
        tl.store(ids_ptr + token * TOP_K + k, best.to(tl.int64))
        tl.store(weights_ptr + token * TOP_K + k, weight)
        total += weight
        remaining = tl.where(picked, -float("inf"), remaining)
        chosen = chosen | picked
    _count(counts_ptr, real_tokens_ptr, token, experts, chosen, COUNT, LIMITED)
    _rescale(weights_ptr + token * TOP_K, total, TOP_K, RENORMALIZE, SCALE)


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool, scaling_factor: float = 1.0,
                 counts: torch.Tensor | None = None, real_tokens: torch.Tensor | None = None):
    """counts [E] int64, if given: each chosen expert's entry goes up by one (in the same kernel); real_tokens
    (int32 [1] on the device), if given: only the first real_tokens tokens count."""
    num_tokens, num_experts = logits.shape
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    if num_tokens:
        _softmax_topk_kernel[(num_tokens,)](logits, ids, weights, *_counting(ids, counts, real_tokens), num_experts,
                                            logits.stride(0), top_k, renormalize, float(scaling_factor),
                                            triton.next_power_of_2(num_experts), counts is not None,
                                            real_tokens is not None)
    return ids, weights


def grouped_topk(logits: torch.Tensor, correction_bias: torch.Tensor, moe: MoEConfig,
                 counts: torch.Tensor | None = None, real_tokens: torch.Tensor | None = None):
    num_tokens, num_experts = logits.shape
    group_size = num_experts // moe.num_groups
    ids = torch.empty(num_tokens, moe.top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(num_tokens, moe.top_k, dtype=torch.float32, device=logits.device)
    if num_tokens:
        _grouped_topk_kernel[(num_tokens,)](logits, correction_bias, ids, weights,
                                            *_counting(ids, counts, real_tokens), logits.stride(0), moe.num_groups,
                                            group_size, moe.topk_groups, moe.top_k, moe.renormalize,
                                            float(moe.scaling_factor), counts is not None, real_tokens is not None)
    return ids, weights


def _counting(ids: torch.Tensor, counts: torch.Tensor | None, real_tokens: torch.Tensor | None):
    """The kernels' counts and real_tokens pointers (ids stands in for one not given: it is not read)."""
    if real_tokens is not None and (real_tokens.dtype != torch.int32 or real_tokens.numel() != 1):
        raise ValueError(f"real_tokens must be one int32, got {real_tokens.dtype} {tuple(real_tokens.shape)}")
    return (ids if counts is None else counts), (ids if real_tokens is None else real_tokens)


def route(logits: torch.Tensor, moe: MoEConfig, correction_bias: torch.Tensor | None,
          counts: torch.Tensor | None = None, real_tokens: torch.Tensor | None = None):
    if moe.scoring == "softmax":
        return softmax_topk(logits, moe.top_k, moe.renormalize, moe.scaling_factor, counts, real_tokens)
    return grouped_topk(logits, correction_bias, moe, counts, real_tokens)


def supports(moe: MoEConfig) -> bool:
    """The routing rules these kernels implement (others run the torch reference)."""
    if moe.scoring == "softmax" and moe.group_score is None:
        return True
    groups_ok = moe.group_score == "top2_sum" and moe.correction_bias
    sizes_ok = _power_of_two(moe.num_groups) and _power_of_two(moe.num_experts // max(moe.num_groups, 1))
    return bool(groups_ok and sizes_ok and moe.num_experts // moe.num_groups >= 2)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
