"""Routers: token -> (top-k expert ids, their weights), for every family's routing rule."""

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.config import MoEConfig
from moeserve.ops.moe import moe_route


class Router(nn.Module):
    """x [T, H] -> (topk_ids [T, K] int64, topk_weights [T, K] fp32), through the implementation
    moeserve.ops.moe chooses (on CUDA the routing kernels); `reference` is `select_experts`."""

    def __init__(self, hidden_size: int, moe: MoEConfig):
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden_size))
        self.fp32_params = ("weight",) if moe.logits_fp32 else ()
        if moe.correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(moe.num_experts), requires_grad=False)
            self.fp32_params += ("e_score_correction_bias",)

    def forward(self, x: torch.Tensor, counts: torch.Tensor | None = None,
                real_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """counts [E] int64, if given, counts the chosen experts of the first real_tokens tokens (see moe_route)."""
        if self.moe.logits_fp32:
            logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x, self.weight)
        return moe_route(self, logits, counts, real_tokens)

    @property
    def correction_bias(self) -> torch.Tensor | None:
        return getattr(self, "e_score_correction_bias", None)

    def reference(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return select_experts(logits, self.moe, self.correction_bias)


def select_experts(
    logits: torch.Tensor,  # [T, E]
    moe: MoEConfig,
    correction_bias: torch.Tensor | None = None,  # [E]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing rules, as their reference implementations compute them (fp32):
    softmax top-k with optional renormalisation (Mixtral, Qwen, DeepSeek-V2 greedy); group-limited greedy
    (DeepSeek-V2: softmax, groups scored by their max); noaux_tc (DeepSeek-V3: sigmoid, bias for selection
    only, groups scored by the sum of their top-2); sigmoid top-1 (Llama 4)."""
    scores = logits.float().softmax(dim=-1) if moe.scoring == "softmax" else logits.float().sigmoid()
    if correction_bias is not None:
        choice = scores + correction_bias.float()
    elif moe.scoring == "sigmoid":
        choice = logits.float()  # sigmoid is monotonic; raw logits do not saturate into ties
    else:
        choice = scores
    if moe.group_score is not None:
        choice = mask_to_top_groups(choice, moe)
    topk_ids = top_k_lowest_index(choice, moe.top_k)  # [T, K]
    topk_weights = scores.gather(1, topk_ids)
    if moe.renormalize:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_ids, topk_weights * moe.scaling_factor


def top_k_lowest_index(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values, best first; among equal values the lowest index wins
    (torch.topk leaves ties unspecified; the routing kernels break them this way too)."""
    return values.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def mask_to_top_groups(choice: torch.Tensor, moe: MoEConfig) -> torch.Tensor:
    """Keep the experts of the `topk_groups` best of `num_groups` contiguous groups; others -> -inf."""
    grouped = choice.unflatten(-1, (moe.num_groups, -1))  # [T, G, E/G]
    if moe.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.sort(dim=-1, descending=True).values[..., :2].sum(dim=-1)  # [T, G]: sum of top-2
    top_groups = top_k_lowest_index(group_scores, moe.topk_groups)
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)
