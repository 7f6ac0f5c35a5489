"""Attention over whole sequences with no cache: the plain forward and the reference for the engine."""

import torch


def causal_mask(
    q_positions: torch.Tensor,  # [Sq]
    k_positions: torch.Tensor,  # [Sk]
    sliding_window: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """allowed[i, j]: query i may attend key j. Sliding window keeps the last `sliding_window` keys
    (Mistral, Hugging Face convention); chunked attention keeps keys in the query's chunk (Llama 4)."""
    q, k = q_positions[:, None], k_positions[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed &= k > q - sliding_window
    if chunk_size is not None:
        allowed &= torch.div(k, chunk_size, rounding_mode="floor") == torch.div(q, chunk_size, rounding_mode="floor")
    return allowed  # [Sq, Sk]


def dense_attention(
    q: torch.Tensor,  # [B, Sq, Hq, D]
    k: torch.Tensor,  # [B, Sk, Hk, D]
    v: torch.Tensor,  # [B, Sk, Hk, Dv]
    allowed: torch.Tensor,  # [Sq, Sk] bool
    scale: float,
) -> torch.Tensor:  # [B, Sq, Hq, Dv]
    """Eager attention as Hugging Face computes it: scores in the input dtype, softmax in fp32.
    Query head h reads KV head h // (Hq / Hk)."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)
