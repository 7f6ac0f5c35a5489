"""Attention math shared by the backends: masks, eager attention (with its log-sum-exp), and the
exact merge of two partial attentions over disjoint key sets."""

import torch


def causal_mask(
    q_positions: torch.Tensor,  # [..., Sq]
    k_positions: torch.Tensor,  # [..., Sk]
    sliding_window: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """allowed[..., i, j]: query i may attend key j. Sliding window keeps the last `sliding_window` keys
    (Mistral, Hugging Face convention); chunked attention keeps keys in the query's chunk (Llama 4)."""
    q, k = q_positions[..., :, None], k_positions[..., None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed &= k > q - sliding_window
    if chunk_size is not None:
        allowed &= torch.div(k, chunk_size, rounding_mode="floor") == torch.div(q, chunk_size, rounding_mode="floor")
    return allowed  # [..., Sq, Sk]


def attention_with_lse(
    q: torch.Tensor,  # [..., Sq, Hq, D]
    k: torch.Tensor,  # [..., Sk, Hk, D]
    v: torch.Tensor,  # [..., Sk, Hk, Dv]
    allowed: torch.Tensor,  # [..., Sq, Sk] bool
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # out [..., Sq, Hq, Dv], lse [..., Hq, Sq] fp32
    """Eager attention as Hugging Face computes it: scores in the input dtype, softmax in fp32.
    Query head h reads KV head h // (Hq / Hk), without copying the KV heads (MLA's absorbed decode is
    MQA: one latent head for all query heads). A query with no allowed key gets out 0, lse -inf."""
    kv_heads = k.shape[-2]
    grouped_q = q.unflatten(-2, (kv_heads, q.shape[-2] // kv_heads))  # [..., Sq, Hk, G, D]
    scores = torch.einsum("...qhgd,...khd->...hgqk", grouped_q, k).flatten(-4, -3) * scale  # [..., Hq, Sq, Sk]
    scores = scores.float().masked_fill(~allowed.unsqueeze(-3), float("-inf"))  # mask broadcast over heads
    lse = torch.logsumexp(scores, dim=-1)  # [..., Hq, Sq]
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0).to(q.dtype)
    grouped_probs = probs.unflatten(-3, (kv_heads, probs.shape[-3] // kv_heads))  # [..., Hk, G, Sq, Sk]
    return torch.einsum("...hgqk,...khd->...qhgd", grouped_probs, v).flatten(-3, -2), lse


def dense_attention(q, k, v, allowed, scale) -> torch.Tensor:
    return attention_with_lse(q, k, v, allowed, scale)[0]


def merge_attention(
    out_a: torch.Tensor,  # [Sq, H, Dv]
    lse_a: torch.Tensor,  # [H, Sq]
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # out [Sq, H, Dv], lse [H, Sq]
    """Attention over keys A and B from the attentions over A and over B (arXiv 2501.01005, 2.2); the
    merged lse lets further key sets be merged in."""
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).nan_to_num(0.0).transpose(0, 1).unsqueeze(-1)  # [Sq, H, 1]
    weight_b = torch.exp(lse_b - lse).nan_to_num(0.0).transpose(0, 1).unsqueeze(-1)
    return (out_a.float() * weight_a + out_b.float() * weight_b).to(out_a.dtype), lse
