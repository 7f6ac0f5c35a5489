"""How many KV blocks fit: a fixed budget on CPU; on CUDA what a profiling pass of the largest batch
leaves under gpu_memory_utilization."""

import logging

import torch

from moeserve.config import ConfigError
from moeserve.engine.args import EngineArgs
from moeserve.engine.kv_cache import bytes_per_block
from moeserve.layers.attention.backend import DenseAttention
from moeserve.models.base import CausalLM

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 512 * 2**20


PROFILE_SEQ_LEN = 2048  # dense attention's scores grow with the square of a sequence: the token budget is profiled
# as sequences of at most this many tokens (the engine's prefill runs flash kernels, whose memory is linear)


def profile_batch_shape(num_tokens: int, max_model_len: int) -> tuple[int, int]:
    """(sequences, tokens each) covering at least num_tokens, none longer than PROFILE_SEQ_LEN or max_model_len."""
    longest = max(1, min(PROFILE_SEQ_LEN, max_model_len))
    batch = -(-num_tokens // longest)
    return batch, -(-num_tokens // batch)


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
                    tp: int = 1) -> int:
    block_bytes = bytes_per_block(model.config, args.block_size, dtype, tp)
    where = ""
    if args.kv_cache_memory is not None:
        budget = args.kv_cache_memory
    elif device.type == "cuda":
        activations = profile_peak_activation_bytes(model, args, max_model_len, device)
        free, total = torch.cuda.mem_get_info(device)
        budget = args.gpu_memory_utilization * total - (total - free) - activations
        where = (f" (GPU: {total / 2**30:.1f} GiB, {(total - free) / 2**30:.1f} GiB in use with this model's weights "
                 f"and anything else on the GPU, {activations / 2**30:.2f} GiB peak activations)")
        logger.info("KV cache budget %.1f GiB%s", budget / 2**30, where)
    else:
        budget = DEFAULT_CPU_KV_CACHE_BYTES
    num_blocks = max(int(budget // block_bytes), 0)
    if num_blocks * args.block_size < max_model_len:
        raise ConfigError(f"the KV cache holds {num_blocks * args.block_size} tokens, fewer than "
                          f"max_model_len={max_model_len}{where}: lower max_model_len or give the cache more memory "
                          "(kv_cache_memory, gpu_memory_utilization)")
    return num_blocks
