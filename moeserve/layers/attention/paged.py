"""Attention over the paged KV cache: what every backend shares, and the torch reference backend.

Each step a backend writes the new tokens' keys (or MLA latents) through the slot mapping, then attends
over each sequence's context read through the block table (AttentionMetadata; decodes first). MLA decodes
in the absorbed form (MQA over the cached latent, W_UK folded into the query and W_UV into the output);
an MLA prefill chunk attends to itself causally in the plain form, then to its cached prefix,
decompressed through kv_b_proj a chunk of positions at a time, and the parts are merged by log-sum-exp.
TorchPagedAttention is the reference (any device); TritonPagedAttention (layers/attention/paged_triton.py)
replaces its kernels on CUDA.
"""

import torch

from moeserve.kernels.attention.cache_write import write_kv_cache_reference, write_mla_cache_reference
from moeserve.kernels.attention.flash_prefill import flash_attention_varlen_reference
from moeserve.kernels.attention.gqa_paged import paged_prefill_reference
from moeserve.kernels.attention.paged import from_cache_dtype, padded_context_slots
from moeserve.layers.attention.dense import attention_with_lse, causal_mask, merge_attention
from moeserve.layers.attention.metadata import AttentionMetadata, ranges_of_rows, slots_of

PREFIX_CHUNK_ELEMENTS = 2**19  # cached-prefix positions x heads decompressed at once (~320 MiB of bf16 K/V for V3)


class TorchPagedAttention:
    """The engine's AttentionBackend in torch; `bind` gives it each step's metadata."""

    def __init__(self, kv_caches: list[torch.Tensor], kv_scales: torch.Tensor | None):
        self.kv_caches = kv_caches  # per layer: MLA [num_blocks, block_size, L + R]; GQA [2, num_blocks, block_size, Hk, D]
        self.kv_scales = kv_scales  # [num_layers] fp32 for an FP8 cache, else None
        self.metadata: AttentionMetadata | None = None
        self.step_prefix_chunks: dict[int, list] = {}  # per number of heads, for every layer of the step

    def bind(self, metadata: AttentionMetadata) -> "TorchPagedAttention":
        self.metadata = metadata
        self.step_prefix_chunks = {}
        return self

    def split_batch(self) -> list[tuple[slice, "TorchPagedAttention"]]:
        """Two-batch overlap: the bound batch as two (its tokens, a backend bound to it), split where its tokens halve
        (AttentionMetadata.halving_point; the second may be empty). They share the cache."""
        parts = self.metadata.split(self.metadata.halving_point())
        tokens = parts[0].num_tokens
        return [(where, type(self)(self.kv_caches, self.kv_scales).bind(part))
                for where, part in zip((slice(0, tokens), slice(tokens, None)), parts)]

    def kv_scale(self, layer: int) -> torch.Tensor | None:
        return None if self.kv_scales is None else self.kv_scales[layer : layer + 1]

    # The two calls of the AttentionBackend protocol

    def gqa(self, layer, q, k, v, scale, sliding_window, chunk_size):
        md, kv_scale = self.metadata, self.kv_scale(layer)
        k_cache, v_cache = self.kv_caches[layer].unbind(0)  # [num_blocks, block_size, Hk, D] each
        self.write_kv(k_cache, v_cache, k, v, md.slot_mapping, kv_scale)
        d = md.num_decodes
        if d and d == q.shape[0]:  # decodes only: no output to assemble
            return self.gqa_decode(q, k_cache, v_cache, md.block_table, md.seq_lens, scale, sliding_window,
                                   chunk_size, kv_scale)
        out = torch.empty_like(q)
        if d:
            out[:d] = self.gqa_decode(q[:d], k_cache, v_cache, md.block_table[:d], md.seq_lens[:d], scale,
                                      sliding_window, chunk_size, kv_scale)
        if q.shape[0] > d:
            out[d:] = self.gqa_prefill(q[d:], k_cache, v_cache, md.block_table[d:], md.prefill_query_start_loc,
                                       md.seq_lens[d:], md.max_prefill_query_len, scale, sliding_window, chunk_size,
                                       kv_scale)
        return out

    def mla(self, layer, q_nope, q_pe, c_kv, k_pe, attention):
        md, kv_scale, cache = self.metadata, self.kv_scale(layer), self.kv_caches[layer]
        self.write_mla(cache, c_kv, k_pe, md.slot_mapping, kv_scale)
        d = md.num_decodes
        if d and d == q_nope.shape[0]:  # decodes only: no output to assemble
            return self.mla_absorbed_decode(attention, q_nope, q_pe, cache, kv_scale)
        out = q_nope.new_empty(*q_nope.shape[:2], attention.mla.v_head_dim)  # [T, Hq, V]
        if d:
            out[:d] = self.mla_absorbed_decode(attention, q_nope[:d], q_pe[:d], cache, kv_scale)
        if q_nope.shape[0] > d:
            out[d:] = self.mla_prefill(attention, q_nope[d:], q_pe[d:], c_kv[d:], k_pe[d:], cache, kv_scale)
        return out

    def mla_absorbed_decode(self, attention, q_nope, q_pe, cache, kv_scale):
        """The batch's first len(q_nope) sequences (its decodes) over their cached latents, W_UK folded into
        the query and W_UV into the output: [D, Hq, V]."""
        md, d = self.metadata, q_nope.shape[0]
        w_uk, w_uv = attention.absorbed_weights(q_nope.dtype)  # [Hq, P, L], [Hq, V, L]
        q_latent = torch.einsum("thp,hpl->thl", q_nope, w_uk)
        latent_out = self.mla_decode(q_latent, q_pe, cache, md.block_table[:d], md.seq_lens[:d], attention.scale,
                                     attention.mla.kv_lora_rank, kv_scale)
        return torch.einsum("thl,hvl->thv", latent_out, w_uv)

    # MLA prefill, the same for every backend but its kernels

    def mla_prefill(self, attention, q_nope, q_pe, c_kv, k_pe, cache, kv_scale):
        """New tokens over themselves (causal), then over the cached prefix, a chunk at a time; merged by LSE."""
        md = self.metadata
        cu_q, max_q = md.prefill_query_start_loc, md.max_prefill_query_len
        q = torch.cat((q_nope, q_pe), dim=-1)  # [P, Hq, P + R]
        k, v = attention.decompress(c_kv, k_pe)
        out, lse = self.attend(q, k, v, cu_q, cu_q, max_q, attention.scale, True)
        for cu_k, slots in self.prefix_chunks(attention.num_heads):
            latent = from_cache_dtype(cache.flatten(0, 1)[slots], q.dtype, kv_scale)  # [N, L + R]
            k, v = attention.decompress(*latent.split([attention.mla.kv_lora_rank, attention.mla.qk_rope_head_dim], -1))
            out, lse = self.merge(out, lse, *self.attend(q, k, v, cu_q, cu_k, max_q, attention.scale, False))
        return out

    def prefix_chunks(self, num_heads: int) -> list:
        """(cu_seqlens_k [P + 1], slots [N]) of the prefill chunks' cached prefixes, up to a bounded number
        of positions of each at a time; computed once a step on the device from the lengths the host knows."""
        if num_heads not in self.step_prefix_chunks:
            self.step_prefix_chunks[num_heads] = list(self.compute_prefix_chunks(num_heads))
        return self.step_prefix_chunks[num_heads]

    def compute_prefix_chunks(self, num_heads: int):
        md = self.metadata
        d = md.num_decodes
        prefixes = [s - q for s, q in zip(md.seq_lens_host[d:], md.query_lens_host[d:])]  # host
        chunk = max(md.block_size, PREFIX_CHUNK_ELEMENTS // num_heads)
        prefix_lens = md.seq_lens[d:] - (md.prefill_query_start_loc[1:] - md.prefill_query_start_loc[:-1])  # device
        for start in range(0, max(prefixes, default=0), chunk):
            total = sum(max(0, min(chunk, p - start)) for p in prefixes)
            lengths = (prefix_lens - start).clamp(0, chunk)  # [P] int32
            rows, positions = ranges_of_rows(torch.full_like(lengths, start), lengths, total)
            cu_k = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
            yield cu_k, slots_of(md.block_table[d:], rows, positions, md.block_size)

    # The kernels: the torch reference's

    def write_kv(self, k_cache, v_cache, k, v, slot_mapping, kv_scale):
        write_kv_cache_reference(k_cache, v_cache, k, v, slot_mapping, kv_scale)

    def write_mla(self, cache, c_kv, k_pe, slot_mapping, kv_scale):
        write_mla_cache_reference(cache, c_kv, k_pe, slot_mapping, kv_scale)

    def gqa_decode(self, q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window, chunk_size, kv_scale):
        """All decodes in one padded batch: [D, Hq, D] over their contexts gathered by slot."""
        slots, valid = padded_context_slots(block_table, seq_lens, self.metadata.max_decode_seq_len, k_cache.shape[1])
        keys = from_cache_dtype(k_cache.flatten(0, 1)[slots], q.dtype, kv_scale)  # [D, S, Hk, D]
        values = from_cache_dtype(v_cache.flatten(0, 1)[slots], q.dtype, kv_scale)
        positions = torch.arange(slots.shape[1], device=q.device)
        allowed = causal_mask((seq_lens.long() - 1)[:, None], positions, sliding_window, chunk_size) & valid[:, None]
        return attention_with_lse(q[:, None], keys, values, allowed, scale)[0][:, 0]

    def gqa_prefill(self, q, k_cache, v_cache, block_table, query_start_loc, seq_lens, max_query_len, scale,
                    sliding_window, chunk_size, kv_scale):
        return paged_prefill_reference(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale,
                                       sliding_window, chunk_size, kv_scale)

    def mla_decode(self, q_latent, q_pe, cache, block_table, seq_lens, scale, kv_lora_rank, kv_scale):
        """q = (q_latent [D, Hq, L], q_pe [D, Hq, R]) over the cached latents (one KV head: MQA) -> [D, Hq, L]."""
        q = torch.cat((q_latent, q_pe), dim=-1)
        slots, valid = padded_context_slots(block_table, seq_lens, self.metadata.max_decode_seq_len, cache.shape[1])
        keys = from_cache_dtype(cache.flatten(0, 1)[slots], q.dtype, kv_scale).unsqueeze(-2)  # [D, S, 1, L + R]
        return attention_with_lse(q[:, None], keys, keys[..., :kv_lora_rank], valid[:, None], scale)[0][:, 0]

    def attend(self, q, k, v, cu_q, cu_k, max_q, scale, causal):
        return flash_attention_varlen_reference(q, k, v, cu_q, cu_k, scale, causal)

    def merge(self, out_a, lse_a, out_b, lse_b):
        return merge_attention(out_a, lse_a, out_b, lse_b)

