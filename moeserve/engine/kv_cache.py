"""The KV cache tensors: allocated once, one view per layer.

MLA layers cache only the latent, [c_kv | k_pe] (kv_lora_rank + qk_rope_head_dim values per token);
GQA layers cache K and V per KV head. The cache is in the model's dtype, or FP8 (E4M3) with one fp32
scale per layer (1.0: the values as they are, as vLLM defaults; x ~= value * scale).
"""

import math

import torch

from moeserve.config import ModelConfig


def layer_cache_shape(config: ModelConfig, num_blocks: int, block_size: int, tp: int = 1) -> tuple[int, ...]:
    """With tensor parallelism a rank caches its KV heads; MLA's latent is shared by all heads."""
    if config.mla is not None:
        return (num_blocks, block_size, config.mla.latent_dim)
    return (2, num_blocks, block_size, config.num_kv_heads // tp, config.head_dim)


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, tp: int = 1) -> int:
    per_layer = math.prod(layer_cache_shape(config, 1, block_size, tp))
    return config.num_layers * per_layer * dtype.itemsize


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    return torch.float8_e4m3fn if kv_cache_dtype == "fp8" else model_dtype


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device, tp: int = 1) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Per layer cache views, and the per-layer scales [num_layers] of an FP8 cache (else None)."""
    shape = layer_cache_shape(config, num_blocks, block_size, tp)
    cache = torch.zeros((config.num_layers, *shape), dtype=dtype, device=device)
    scales = torch.ones(config.num_layers, dtype=torch.float32, device=device) if dtype == torch.float8_e4m3fn else None
    return list(cache.unbind(0)), scales
