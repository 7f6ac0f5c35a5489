"""Outputs and workspaces that start as NaN, so an element a kernel fails to write shows in the result.

The kernel modules' own `torch` is replaced by a proxy whose `empty` fills floating tensors with NaN.
Patching torch.empty itself would not do: torch caches the set of factory functions that `with
torch.device(...)` redirects, and a patched torch.empty caught in that cache sends later allocations to
the wrong device."""

import pytest
import torch

from moeserve.kernels.attention import cache_write, flash_prefill, gqa_paged, mla_decode


class PoisonedTorch:
    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        tensor = torch.empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() and tensor.element_size() > 1 else tensor


@pytest.fixture
def poisoned_empty(monkeypatch):
    for module in (cache_write, flash_prefill, gqa_paged, mla_decode):
        monkeypatch.setattr(module, "torch", PoisonedTorch())
