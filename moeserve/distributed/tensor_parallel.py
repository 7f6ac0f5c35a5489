"""Tensor-parallel building blocks. Column-parallel linears are plain nn.Linear with a slice of the
output features; the modules here add the collective that their sharding needs."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moeserve.layers.linear import QuantLinear
from moeserve.ops.linear import quantized_linear


class RowParallelLinear(nn.Linear):
    """A slice of the input features; the partial products are summed over the group, then the bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group):
        super().__init__(in_features, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


class QuantRowParallelLinear(QuantLinear):
    """A quantized slice of the input features (whole quantization blocks); partial products summed, then the bias."""

    def __init__(self, weight, bias: nn.Parameter | None, group):
        super().__init__(weight, bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = quantized_linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + V/tp) of the embedding; other ids look up zeros, then the group sums."""

    def __init__(self, num_embeddings: int, embedding_dim: int, start: int, group):
        super().__init__(num_embeddings, embedding_dim)
        self.start = start
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        mine = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight) * mine.unsqueeze(-1)
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelLMHead(nn.Linear):
    """Logits of a vocabulary slice, gathered over the group into the full vocabulary."""

    def __init__(self, in_features: int, out_features: int, group, world: int):
        super().__init__(in_features, out_features, bias=False)
        self.group = group
        self.world = world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight).contiguous()  # [N, V/tp]
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)
