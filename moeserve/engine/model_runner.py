"""One engine step on the model: build the flattened batch, run the forward over the paged cache,
sample the sequences whose tokens are all computed, and gather prompt logprobs when asked."""

from dataclasses import dataclass

import torch

from torch.nn.utils.rnn import pad_sequence

from moeserve.engine.paged_attention import Chunk, PagedAttention, PagedBatch
from moeserve.engine.sequence import Logprob, Sequence
from moeserve.layers.sampler import Sampler, SamplerOutput, token_logprobs
from moeserve.models.base import CausalLM


@dataclass
class StepResult:
    sampled: list[Sequence]  # sequences that got a new token, in the order of `output`
    output: SamplerOutput
    prompt_logprobs: dict[int, list[tuple[int, dict[int, Logprob]]]]  # id(seq) -> [(prompt index, entry)]


class ModelRunner:
    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], block_size: int, sampler: Sampler,
                 eos_token_ids: tuple[int, ...]):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler
        self.eos_token_ids = eos_token_ids
        self.device = next(model.parameters()).device
        self.offsets = torch.arange(block_size)
        self.empty_steps = 0  # forwards over no tokens, run to keep other ranks' collectives going

    def context_slots(self, seq: Sequence, length: int) -> torch.Tensor:
        """Cache slots of positions 0..length-1: block_table[p // block_size] * block_size + p % block_size."""
        blocks = torch.tensor(seq.block_table[: -(-length // self.block_size)], dtype=torch.long)
        return (blocks[:, None] * self.block_size + self.offsets).flatten()[:length]

    @torch.no_grad()
    def execute_empty(self) -> None:
        """A forward over zero tokens: what a rank with no work runs, so that collectives inside the
        model (MoE dispatch, tensor-parallel reductions) find every rank."""
        self.empty_steps += 1
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        batch = PagedBatch(empty, [], empty, torch.zeros(0, 0, dtype=torch.long, device=self.device), empty)
        self.model.model(empty, empty, PagedAttention(self.kv_caches, batch))

    @torch.no_grad()
    def execute(self, scheduled: list[tuple[Sequence, int]]) -> StepResult:
        input_ids, positions, slot_mapping, chunks = [], [], [], []
        decode_rows, decode_slots = [], []
        sample_rows, sampled, prompt_rows = [], [], []
        offset = 0
        for seq, num_new in scheduled:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            context_slots = self.context_slots(seq, end)
            slot_mapping.append(context_slots[start:])
            if num_new == 1:
                decode_rows.append(offset)
                decode_slots.append(context_slots)
            else:
                chunks.append(Chunk(slice(offset, offset + num_new), context_slots.to(self.device)))
            if end == seq.num_tokens:
                sample_rows.append(offset + num_new - 1)
                sampled.append(seq)
            if seq.params.prompt_logprobs is not None:
                # the logits at position p score prompt token p + 1
                prompt_rows += [(seq, offset + p - start, p + 1) for p in range(start, min(end, seq.num_prompt_tokens - 1))
                                if p + 1 >= len(seq.prompt_logprobs)]
            offset += num_new
        batch = PagedBatch(
            slot_mapping=torch.cat(slot_mapping).to(self.device),
            chunks=chunks,
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=self.device),
            decode_slots=(pad_sequence(decode_slots, batch_first=True) if decode_slots
                          else torch.zeros(0, 0, dtype=torch.long)).to(self.device),
            decode_positions=torch.tensor([positions[r] for r in decode_rows], dtype=torch.long, device=self.device),
        )
        ids = torch.tensor(input_ids, device=self.device)
        hidden = self.model.model(ids, torch.tensor(positions, device=self.device),
                                  PagedAttention(self.kv_caches, batch))  # [T, H]
        output = SamplerOutput([], [])
        if sampled:
            logits = self.model.compute_logits(hidden[sample_rows])
            output = self.sampler(logits, sampled, self.eos_token_ids)
        return StepResult(sampled, output, self.prompt_logprobs(hidden, ids, prompt_rows))

    def prompt_logprobs(self, hidden, ids, rows) -> dict[int, list[tuple[int, dict[int, Logprob]]]]:
        if not rows:
            return {}
        logits = self.model.compute_logits(hidden[[row for _, row, _ in rows]]).float()
        targets = torch.tensor([seq.token_ids[index] for seq, _, index in rows], device=self.device)
        entries = token_logprobs(torch.log_softmax(logits, dim=-1), targets,
                                 [seq.params.prompt_logprobs for seq, _, _ in rows])
        result: dict[int, list] = {}
        for (seq, _, index), entry in zip(rows, entries):
            result.setdefault(id(seq), []).append((index, entry))
        return result
