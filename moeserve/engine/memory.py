"""How many KV blocks fit: a fixed budget on CPU; on CUDA what a profiling pass of the largest batch
leaves under gpu_memory_utilization, less the decode graphs' pool (the arithmetic of moeserve.engine.plan,
which `moeserve plan` runs before launch)."""

import logging

import torch

from moeserve.config import ConfigError
from moeserve.engine.args import EngineArgs
from moeserve.distributed.layout import ParallelLayout
from moeserve.engine.kv_cache import bytes_per_block
from moeserve.engine.plan import graph_pool_bytes, kv_blocks, kv_cache_budget, profile_batch_shape
from moeserve.layers.attention.backend import DenseAttention
from moeserve.models.base import CausalLM

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 512 * 2**20


@torch.no_grad()
def profile_peak_activation_bytes(model: CausalLM, args: EngineArgs, max_model_len: int, device) -> int:
    """Peak memory above the weights while running the largest step: a full token budget (as several
    sequences when it exceeds one's length), then the logits of max_num_seqs rows."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    largest_step(model, args, max_model_len, device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return peak


@torch.no_grad()
def largest_step(model: CausalLM, args: EngineArgs, max_model_len: int, device) -> torch.Tensor:
    """The forward of a full token budget and the softmax of max_num_seqs rows of logits: [rows, V]."""
    batch, seq_len = profile_batch_shape(args.max_num_batched_tokens, max_model_len)
    num_tokens = batch * seq_len
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    positions = torch.arange(seq_len, device=device).repeat(batch)
    hidden = model.model(ids, positions, DenseAttention(batch, seq_len, device))
    rows = min(args.max_num_seqs, num_tokens)
    return torch.softmax(model.compute_logits(hidden[:rows]).float(), dim=-1)


def plan_num_blocks(model: CausalLM, args: EngineArgs, max_model_len: int, dtype: torch.dtype, device,
                    layout: ParallelLayout = ParallelLayout(), max_graph_batch: int = 0,
                    model_dtype: torch.dtype = torch.bfloat16) -> int:
    """dtype: the KV cache's; max_graph_batch: the largest decode batch captured in a CUDA graph (0: none)."""
    block_bytes = bytes_per_block(model.config, args.block_size, dtype, layout.tp)
    where = ""
    if args.kv_cache_memory is not None:
        budget = args.kv_cache_memory
    elif device.type == "cuda":
        activations = profile_peak_activation_bytes(model, args, max_model_len, device)
        graph_pool = graph_pool_bytes(model.config, layout, model_dtype, max_graph_batch,
                                      max_model_len) if max_graph_batch else 0
        free, total = torch.cuda.mem_get_info(device)
        budget = kv_cache_budget(total, args.gpu_memory_utilization, total - free, activations, graph_pool)
        where = (f" (GPU: {total / 2**30:.1f} GiB, {(total - free) / 2**30:.1f} GiB in use with this model's weights "
                 f"and anything else on the GPU, {activations / 2**30:.2f} GiB peak activations, "
                 f"{graph_pool / 2**30:.2f} GiB for the decode graphs)")
        logger.info("KV cache budget %.1f GiB%s", budget / 2**30, where)
    else:
        budget = DEFAULT_CPU_KV_CACHE_BYTES
    num_blocks = kv_blocks(budget, block_bytes)
    if num_blocks * args.block_size < max_model_len:
        raise ConfigError(f"the KV cache holds {num_blocks * args.block_size} tokens, fewer than "
                          f"max_model_len={max_model_len}{where}: lower max_model_len or give the cache more memory "
                          "(kv_cache_memory, gpu_memory_utilization); `moeserve plan` shows where the memory goes")
    return num_blocks
