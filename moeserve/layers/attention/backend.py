"""Where attention modules hand over their projected q/k/v: the attention backend.

Model code projects and rotates; a backend stores keys in its cache (if it has one) and attends.
`DenseAttention` serves the plain forward (whole sequences, no cache); the engine's paged backends
(layers/attention/paged.py: the torch reference; paged_triton.py: the Triton kernels, chosen on CUDA)
implement the same two calls. Tokens are flattened: T tokens of all sequences together.
"""

from typing import Protocol

import torch

from moeserve.layers.attention.dense import causal_mask, dense_attention


class AttentionBackend(Protocol):
    def gqa(
        self,
        layer: int,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hk, D]
        v: torch.Tensor,  # [T, Hk, D]
        scale: float,
        sliding_window: int | None,
        chunk_size: int | None,
    ) -> torch.Tensor: ...  # [T, Hq, D]

    def mla(
        self,
        layer: int,
        q_nope: torch.Tensor,  # [T, Hq, P]
        q_pe: torch.Tensor,  # [T, Hq, R] (rotated)
        c_kv: torch.Tensor,  # [T, L] (normed latent)
        k_pe: torch.Tensor,  # [T, R] (rotated)
        attention,  # the MLAttention module: kv_b_proj, absorbed weights, scale
    ) -> torch.Tensor: ...  # [T, Hq, V]


def paged_attention_backend(name: str, device: torch.device, kv_caches: list[torch.Tensor],
                            kv_scales: torch.Tensor | None):
    """The engine's paged attention, chosen once per engine by device (or by name)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton":
        if device.type != "cuda":
            raise ValueError(f"the triton attention backend runs on CUDA, not {device}; use --attention-backend torch")
        from moeserve.layers.attention.paged_triton import TritonPagedAttention

        return TritonPagedAttention(kv_caches, kv_scales)
    from moeserve.layers.attention.paged import TorchPagedAttention

    return TorchPagedAttention(kv_caches, kv_scales)


class DenseAttention:
    """B sequences of S tokens each, all starting at position 0, attending causally; no cache.
    MLA runs in the plain form, or the absorbed form when `mla_absorbed` (they are equal)."""

    def __init__(self, batch_size: int, seq_len: int, device: torch.device, mla_absorbed: bool = False):
        self.batch_size, self.seq_len = batch_size, seq_len
        self.positions = torch.arange(seq_len, device=device)
        self.mla_absorbed = mla_absorbed

    def split_batch(self) -> list[tuple[slice, "DenseAttention"]]:
        """Two-batch overlap: the first half of the sequences (rounded up), and the rest (may be none)."""
        first = -(-self.batch_size // 2)
        device = self.positions.device
        return [(slice(0, first * self.seq_len), DenseAttention(first, self.seq_len, device, self.mla_absorbed)),
                (slice(first * self.seq_len, None),
                 DenseAttention(self.batch_size - first, self.seq_len, device, self.mla_absorbed))]

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(self.batch_size, self.seq_len, *x.shape[1:])

    def gqa(self, layer, q, k, v, scale, sliding_window, chunk_size):
        allowed = causal_mask(self.positions, self.positions, sliding_window, chunk_size)
        return dense_attention(self.batched(q), self.batched(k), self.batched(v), allowed, scale).flatten(0, 1)

    def mla(self, layer, q_nope, q_pe, c_kv, k_pe, attention):
        from moeserve.layers.attention.mla import mla_absorbed, mla_plain

        allowed = causal_mask(self.positions, self.positions)
        form = mla_absorbed if self.mla_absorbed else mla_plain
        b = self.batched
        return form(attention, b(q_nope), b(q_pe), b(c_kv), b(k_pe), allowed)[0].flatten(0, 1)
