"""The paged attention backend on CUDA: the Triton kernels of moeserve.kernels.attention in place of the
torch reference's gathers (the steps around them, MLA's absorption and prefix chunks, are shared)."""

from moeserve.kernels.attention.cache_write import write_kv_cache, write_mla_cache
from moeserve.kernels.attention.flash_prefill import flash_attention_varlen, merge_attention_states
from moeserve.kernels.attention.gqa_paged import paged_decode, paged_decode_num_splits, paged_prefill
from moeserve.kernels.attention.mla_decode import mla_decode, mla_decode_num_splits
from moeserve.layers.attention.paged import TorchPagedAttention


class TritonPagedAttention(TorchPagedAttention):
    """Split-KV decodes take as many splits as fill the GPU for this step's longest context (a host
    number); the kernels read each split's range from seq_lens on the device, so a split count fixed
    per batch size (for CUDA graphs) works as well."""

    def write_kv(self, k_cache, v_cache, k, v, slot_mapping, kv_scale):
        write_kv_cache(k_cache, v_cache, k, v, slot_mapping, kv_scale)

    def write_mla(self, cache, c_kv, k_pe, slot_mapping, kv_scale):
        write_mla_cache(cache, c_kv, k_pe, slot_mapping, kv_scale)

    def gqa_decode(self, q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window, chunk_size, kv_scale):
        splits = paged_decode_num_splits(q.shape[0], k_cache.shape[2], self.metadata.max_decode_seq_len, q.device)
        return paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale, splits, sliding_window, chunk_size,
                            kv_scale)

    def gqa_prefill(self, q, k_cache, v_cache, block_table, query_start_loc, seq_lens, max_query_len, scale,
                    sliding_window, chunk_size, kv_scale):
        return paged_prefill(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, max_query_len, scale,
                             sliding_window, chunk_size, kv_scale)

    def mla_decode(self, q_latent, q_pe, cache, block_table, seq_lens, scale, kv_lora_rank, kv_scale):
        splits = mla_decode_num_splits(q_latent.shape[0], q_latent.shape[1], self.metadata.max_decode_seq_len,
                                       q_latent.device)
        return mla_decode(q_latent, cache, block_table, seq_lens, scale, splits, kv_lora_rank, kv_scale, q_pe=q_pe)

    def attend(self, q, k, v, cu_q, cu_k, max_q, scale, causal):
        return flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, scale, causal)

    def merge(self, out_a, lse_a, out_b, lse_b):
        return merge_attention_states(out_a, lse_a, out_b, lse_b)
