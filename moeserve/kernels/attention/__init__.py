"""Attention kernels over the paged KV cache (Triton), each beside its torch reference."""
