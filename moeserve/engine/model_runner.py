"""One engine step on the model: lay out the batch (decodes first), send its token ids, positions and
attention metadata to the device in one non-blocking copy, run the forward over the paged cache,
sample the sequences whose tokens are all computed, and gather prompt logprobs when asked."""

from dataclasses import dataclass

import torch

from moeserve.engine.block_manager import BlockManager
from moeserve.engine.sequence import Logprob, Sequence
from moeserve.engine.staging import HostToDevice
from moeserve.layers.attention.backend import paged_attention_backend
from moeserve.layers.attention.metadata import AttentionMetadata, slots_of
from moeserve.layers.sampler import Sampler, SamplerOutput, token_logprobs
from moeserve.models.base import CausalLM


@dataclass
class StepResult:
    sampled: list[Sequence]  # sequences that got a new token, in the order of `output`
    output: SamplerOutput
    prompt_logprobs: dict[int, list[tuple[int, dict[int, Logprob]]]]  # id(seq) -> [(prompt index, entry)]


class ModelRunner:
    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], kv_scales: torch.Tensor | None,
                 block_manager: BlockManager, sampler: Sampler, eos_token_ids: tuple[int, ...],
                 max_num_batched_tokens: int, max_num_seqs: int, attention_backend: str = "auto"):
        self.model = model
        self.block_table = block_manager.block_table
        self.block_size = block_manager.block_size
        self.sampler = sampler
        self.eos_token_ids = eos_token_ids
        self.device = next(model.parameters()).device
        self.attention = paged_attention_backend(attention_backend, self.device, kv_caches, kv_scales)
        # per step: [ids T | positions T | batch row of each token T | query_start_loc B+1 | seq_lens B | table rows B]
        self.inputs = HostToDevice((3 * max_num_batched_tokens + 3 * max_num_seqs + 1,), torch.int32, self.device)
        self.empty_steps = 0  # forwards over no tokens, run to keep other ranks' collectives going

    @torch.no_grad()
    def execute_empty(self) -> None:
        """A forward over zero tokens: what a rank with no work runs, so that collectives inside the
        model (MoE dispatch, tensor-parallel reductions) find every rank."""
        self.empty_steps += 1
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        metadata = AttentionMetadata.empty(self.device, self.block_table.max_blocks_per_seq, self.block_size)
        self.model.model(empty, empty, self.attention.bind(metadata))

    @torch.no_grad()
    def execute(self, scheduled: list[tuple[Sequence, int]]) -> StepResult:
        scheduled = sorted(scheduled, key=lambda item: item[1] != 1)  # decodes first (a stable sort)
        ids, positions, metadata = self.prepare(scheduled)
        hidden = self.model.model(ids, positions, self.attention.bind(metadata))  # [T, H]
        sample_rows, sampled, prompt_rows = [], [], []
        offset = 0
        for seq, num_new in scheduled:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            if end == seq.num_tokens:
                sample_rows.append(offset + num_new - 1)
                sampled.append(seq)
            if seq.params.prompt_logprobs is not None:
                # the logits at position p score prompt token p + 1
                prompt_rows += [(seq, offset + p - start, p + 1) for p in range(start, min(end, seq.num_prompt_tokens - 1))
                                if p + 1 >= len(seq.prompt_logprobs)]
            offset += num_new
        output = SamplerOutput([], [])
        if sampled:
            logits = self.model.compute_logits(hidden[sample_rows])
            output = self.sampler(logits, sampled, self.eos_token_ids)
        return StepResult(sampled, output, self.prompt_logprobs(hidden, ids, prompt_rows))

    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's token ids [T], positions [T] and attention metadata, on the device."""
        ids, positions, token_rows, query_start, seq_lens, rows = [], [], [], [0], [], []
        for b, (seq, num_new) in enumerate(scheduled):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            token_rows += [b] * num_new
            query_start.append(query_start[-1] + num_new)
            seq_lens.append(end)
            rows.append(seq.block_row)
        num_tokens, batch = len(ids), len(scheduled)
        staged = self.inputs.writable()
        packed = ids + positions + token_rows + query_start + seq_lens + rows
        staged[: len(packed)] = packed
        self.block_table.sync()
        on_device = self.inputs.send(len(packed))
        ids_d, positions_d, token_rows_d, query_start_d, seq_lens_d, rows_d = on_device.split(
            [num_tokens] * 3 + [batch + 1, batch, batch])
        block_table = self.block_table.table[rows_d.long()]  # [B, max_blocks_per_seq]
        metadata = AttentionMetadata(
            num_decodes=sum(1 for _, num_new in scheduled if num_new == 1),
            query_start_loc=query_start_d, seq_lens=seq_lens_d, block_table=block_table,
            slot_mapping=slots_of(block_table, token_rows_d, positions_d, self.block_size), block_size=self.block_size,
            query_lens_host=[num_new for _, num_new in scheduled], seq_lens_host=seq_lens)
        return ids_d.long(), positions_d.long(), metadata

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
