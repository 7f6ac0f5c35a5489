import torch
from torch import nn

from moeserve.config import MoEConfig
from moeserve.layers.mlp import MLP
from moeserve.layers.moe.dispatch import LocalDispatcher
from moeserve.layers.moe.experts import Experts
from moeserve.layers.moe.router import Router
from moeserve.layers.stages import Stages, run


class MoE(nn.Module):
    """router -> dispatch -> experts -> combine (+ shared expert, optionally sigmoid-gated)."""

    def __init__(self, hidden_size: int, moe: MoEConfig):
        super().__init__()
        self.moe = moe
        self.gate = Router(hidden_size, moe)
        self.experts = Experts(moe.num_experts, hidden_size, moe.intermediate_size)
        if moe.shared_intermediate_size:
            self.shared_experts = MLP(hidden_size, moe.shared_intermediate_size)
        if moe.shared_expert_gate:
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        self.dispatcher = LocalDispatcher(moe.num_experts)
        self.routed_tokens: torch.Tensor | None = None  # [E] tokens routed to each expert so far (metrics)
        self.real_tokens: torch.Tensor | None = None  # int32 [1] on the device, if set: the rows of a batch that count
        # in routed_tokens (the engine's step inputs hold it; a captured decode batch's padding rows follow them). Rows
        # are taken in step order: a micro-batch's own row numbers stay below it only because micro-batches run eager
        # (unpadded) steps; a forward that bypasses the engine's send counts as many rows as the last step had.

    @property
    def expert_tokens(self) -> torch.Tensor:
        return self.routed_tokens if self.routed_tokens is not None else torch.zeros(self.moe.num_experts, dtype=torch.long)

    def routed_counter(self, device: torch.device) -> torch.Tensor:
        """routed_tokens on `device`, made at first use; routing adds to it on the device (no sync)."""
        if self.routed_tokens is None or self.routed_tokens.device != device:
            self.routed_tokens = torch.zeros(self.moe.num_experts, dtype=torch.long, device=device)
        return self.routed_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run(self.stages(x))

    def stages(self, x: torch.Tensor, micro_batch: int = 0) -> Stages:
        """The forward, yielding while tokens travel (moeserve.layers.stages): after the dispatch's send half, and
        after the combine's, with the shared expert computed while the results come back."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, H]
        topk_ids, topk_weights = self.gate(x, self.routed_counter(x.device), self.real_tokens)  # [T, K]
        expert_in = x
        if self.moe.weights_on_input:  # top-1 only (checked at config time): scale, then combine with 1
            expert_in = x * topk_weights.to(x.dtype)
            topk_weights = torch.ones_like(topk_weights)
        sent = self.dispatcher.dispatch_send(expert_in, topk_ids, topk_weights, micro_batch)
        yield
        rows, layout, handle = self.dispatcher.dispatch_recv(sent)
        y = self.experts(rows, layout, out=self.dispatcher.results_buffer(handle))
        sent = self.dispatcher.combine_send(y, handle)
        shared = self.shared_output(x)
        yield
        out = self.dispatcher.combine_recv(sent)
        if shared is not None:
            out = out + shared
        return out.reshape(shape)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        if not hasattr(self, "shared_experts"):
            return None
        shared = self.shared_experts(x)
        if hasattr(self, "shared_expert_gate"):
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return shared
