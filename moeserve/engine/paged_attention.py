"""Attention over the paged KV cache: the torch reference backend.

Each step writes the new tokens' keys (or MLA latents) through the slot mapping, then every sequence
attends over its whole context, read through its block table. MLA decodes in the absorbed form over
the latent; an MLA prefill chunk attends to itself causally in the plain form and to its cached
context in a second pass, and the two are merged by log-sum-exp.
"""

from dataclasses import dataclass

import torch

from moeserve.layers.attention.dense import attention_with_lse, causal_mask, merge_attention
from moeserve.layers.attention.mla import mla_absorbed, mla_plain


@dataclass
class PagedBatch:
    """Where each sequence's tokens live. Sequences are in batch order; tokens are flattened."""

    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) of each new token
    query_lens: list[int]  # new tokens of each sequence
    context_lens: list[int]  # tokens in the cache for each sequence once this step's are written
    context_slots: list[torch.Tensor]  # per sequence: [context_len] slots of its tokens, in order


class PagedAttention:
    def __init__(self, kv_caches: list[torch.Tensor], batch: PagedBatch):
        self.kv_caches = kv_caches
        self.batch = batch

    def sequences(self):
        """(token range of the sequence in the batch, its context length, its context slots)."""
        start = 0
        for query_len, context_len, slots in zip(self.batch.query_lens, self.batch.context_lens,
                                                 self.batch.context_slots):
            yield slice(start, start + query_len), context_len, slots
            start += query_len

    def gqa(self, layer, q, k, v, scale, sliding_window, chunk_size):
        cache = self.kv_caches[layer]  # [2, num_blocks, block_size, Hk, D]
        keys, values = cache[0].flatten(0, 1), cache[1].flatten(0, 1)  # [slots, Hk, D]
        keys[self.batch.slot_mapping] = k
        values[self.batch.slot_mapping] = v
        out = torch.empty_like(q)
        for tokens, context_len, slots in self.sequences():
            positions = torch.arange(context_len, device=q.device)
            allowed = causal_mask(positions[context_len - q[tokens].shape[0] :], positions, sliding_window, chunk_size)
            out[tokens] = attention_with_lse(q[tokens], keys[slots], values[slots], allowed, scale)[0]
        return out

    def mla(self, layer, q_nope, q_pe, c_kv, k_pe, attention):
        latent_cache = self.kv_caches[layer].flatten(0, 1)  # [slots, L + R]
        kv_lora_rank = c_kv.shape[-1]
        latent_cache[self.batch.slot_mapping] = torch.cat((c_kv, k_pe), dim=-1)
        out = q_nope.new_empty(*q_nope.shape[:2], attention.mla.v_head_dim)
        for tokens, context_len, slots in self.sequences():
            query_len = q_nope[tokens].shape[0]
            latent = latent_cache[slots]  # [context_len, L + R]
            cached_c_kv, cached_k_pe = latent[:, :kv_lora_rank], latent[:, kv_lora_rank:]
            positions = torch.arange(context_len, device=q_nope.device)
            new = slice(context_len - query_len, context_len)
            if query_len == 1:  # decode: MQA over the latent
                out[tokens] = mla_absorbed(attention, q_nope[tokens], q_pe[tokens], cached_c_kv, cached_k_pe,
                                           causal_mask(positions[new], positions))[0]
                continue
            out_new, lse_new = mla_plain(attention, q_nope[tokens], q_pe[tokens], cached_c_kv[new], cached_k_pe[new],
                                         causal_mask(positions[new], positions[new]))
            if query_len < context_len:  # a later chunk: also attend to the cached context
                past = slice(0, context_len - query_len)
                out_past, lse_past = mla_plain(attention, q_nope[tokens], q_pe[tokens], cached_c_kv[past],
                                               cached_k_pe[past], causal_mask(positions[new], positions[past]))
                out_new = merge_attention(out_new, lse_new, out_past, lse_past)
            out[tokens] = out_new
        return out
