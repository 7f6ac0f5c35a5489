"""Attention over the paged KV cache: the torch reference backend.

Each step writes the new tokens' keys (or MLA latents) through the slot mapping, then attends over
each sequence's whole context, read through its block table. Decodes (one new token) attend
together in one padded batch; prefill chunks attend one sequence at a time. MLA decodes in the
absorbed form over the latent; an MLA prefill chunk attends to itself causally in the plain form and
to its cached context in a second pass, and the two are merged by log-sum-exp.
"""

from dataclasses import dataclass

import torch

from moeserve.layers.attention.dense import attention_with_lse, causal_mask, merge_attention
from moeserve.layers.attention.mla import mla_absorbed_latent, mla_plain


@dataclass
class Chunk:
    """A sequence computing several tokens this step."""

    tokens: slice  # its rows in the flattened batch
    context_slots: torch.Tensor  # [context_len] cache slots of all its tokens, this step's included


@dataclass
class PagedBatch:
    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) of each new token
    chunks: list[Chunk]
    decode_rows: torch.Tensor  # [N] rows of the sequences computing one token
    decode_slots: torch.Tensor  # [N, Lmax] their context slots, padded (padding sits past the query)
    decode_positions: torch.Tensor  # [N] position of each decode token


class PagedAttention:
    def __init__(self, kv_caches: list[torch.Tensor], batch: PagedBatch):
        self.kv_caches = kv_caches
        self.batch = batch
        self.masks: dict[tuple, torch.Tensor] = {}  # the same for every layer of one step: built once

    def decode_mask(self, sliding_window=None, chunk_size=None) -> torch.Tensor:  # [N, 1, Lmax]
        key = ("decode", sliding_window, chunk_size)
        if key not in self.masks:
            keys = torch.arange(self.batch.decode_slots.shape[-1], device=self.batch.decode_slots.device)
            self.masks[key] = causal_mask(self.batch.decode_positions[:, None], keys, sliding_window, chunk_size)
        return self.masks[key]

    def chunk_mask(self, index: int, query_len: int, sliding_window=None, chunk_size=None) -> torch.Tensor:
        """[Sq, context] for the index-th prefill chunk, whose queries are the last query_len positions."""
        key = ("chunk", index, sliding_window, chunk_size)
        if key not in self.masks:
            context = self.batch.chunks[index].context_slots
            positions = torch.arange(context.numel(), device=context.device)
            self.masks[key] = causal_mask(positions[positions.numel() - query_len :], positions, sliding_window, chunk_size)
        return self.masks[key]

    def gqa(self, layer, q, k, v, scale, sliding_window, chunk_size):
        cache = self.kv_caches[layer]  # [2, num_blocks, block_size, Hk, D]
        keys, values = cache[0].flatten(0, 1), cache[1].flatten(0, 1)  # [slots, Hk, D]
        keys[self.batch.slot_mapping] = k
        values[self.batch.slot_mapping] = v
        out = torch.empty_like(q)
        rows, slots = self.batch.decode_rows, self.batch.decode_slots
        if rows.numel():
            out[rows] = attention_with_lse(q[rows, None], keys[slots], values[slots],
                                           self.decode_mask(sliding_window, chunk_size), scale)[0][:, 0]
        for index, chunk in enumerate(self.batch.chunks):
            allowed = self.chunk_mask(index, q[chunk.tokens].shape[0], sliding_window, chunk_size)
            out[chunk.tokens] = attention_with_lse(q[chunk.tokens], keys[chunk.context_slots],
                                                   values[chunk.context_slots], allowed, scale)[0]
        return out

    def mla(self, layer, q_nope, q_pe, c_kv, k_pe, attention):
        latent_cache = self.kv_caches[layer].flatten(0, 1)  # [slots, L + R]
        rank = c_kv.shape[-1]
        latent_cache[self.batch.slot_mapping] = torch.cat((c_kv, k_pe), dim=-1)
        out = q_nope.new_empty(*q_nope.shape[:2], attention.mla.v_head_dim)
        rows = self.batch.decode_rows
        if rows.numel():  # MQA over the latent
            latent = latent_cache[self.batch.decode_slots]  # [N, Lmax, L + R]
            out[rows] = mla_absorbed_latent(attention, q_nope[rows, None], q_pe[rows, None], latent,
                                            self.decode_mask())[0][:, 0]
        for index, chunk in enumerate(self.batch.chunks):
            out[chunk.tokens] = self.mla_chunk(index, attention, q_nope[chunk.tokens], q_pe[chunk.tokens],
                                               latent_cache[chunk.context_slots], rank)
        return out

    def mla_chunk(self, index, attention, q_nope, q_pe, latent, rank):
        """New tokens over themselves (causal), then over the cached context; merged by log-sum-exp."""
        query_len, context_len = q_nope.shape[0], latent.shape[0]
        c_kv, k_pe = latent[:, :rank], latent[:, rank:]
        allowed = self.chunk_mask(index, query_len)  # [Sq, context]
        new, past = slice(context_len - query_len, context_len), slice(0, context_len - query_len)
        out, lse = mla_plain(attention, q_nope, q_pe, c_kv[new], k_pe[new], allowed[:, new])
        if query_len < context_len:
            out_past, lse_past = mla_plain(attention, q_nope, q_pe, c_kv[past], k_pe[past], allowed[:, past])
            out = merge_attention(out, lse, out_past, lse_past)
        return out
