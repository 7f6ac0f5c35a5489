"""Dispatch / combine: the step between the router and the experts.

`dispatch(x, topk_ids, topk_weights) -> (recv_x, counts, handle)`: rows for the local experts, grouped
by expert (`counts[e]` rows each); `combine(y, handle) -> out`: the weighted sum of each token's expert
outputs, back in token order. The single-device dispatcher here only sorts; expert-parallel
dispatchers (moeserve.distributed.ep) move the rows between ranks behind the same interface.
"""

from dataclasses import dataclass

import torch


@dataclass
class LocalHandle:
    token_of_row: torch.Tensor  # [N] which token each received row came from
    weight_of_row: torch.Tensor  # [N] fp32 routing weight of that (token, expert) pair
    num_tokens: int


class LocalDispatcher:
    """`token_format` (optional) passes each token through a wire format's quantization, as an
    expert-parallel dispatcher would: the single-rank reference for quantized dispatch."""

    def __init__(self, num_experts: int, token_format=None):
        self.num_experts = num_experts
        self.token_format = token_format

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        # x: [T, H], topk_ids / topk_weights: [T, K]
        if self.token_format is not None:
            x = self.token_format.unpack(self.token_format.pack(x), x.shape[1], x.dtype)
        flat_ids = topk_ids.flatten()  # [T*K]
        order = torch.argsort(flat_ids, stable=True)
        token_of_row = order // topk_ids.shape[1]
        counts = torch.bincount(flat_ids, minlength=self.num_experts)  # [E]
        handle = LocalHandle(token_of_row, topk_weights.flatten()[order].float(), x.shape[0])
        return x[token_of_row], counts, handle

    def combine(self, y: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        # y: [N, H] expert outputs in dispatch order -> [T, H]
        out = torch.zeros(handle.num_tokens, y.shape[-1], dtype=torch.float32, device=y.device)
        out.index_add_(0, handle.token_of_row, y.float() * handle.weight_of_row[:, None])
        return out.to(y.dtype)
