"""The sampler: one batched pass per step, each row with its own parameters, in vLLM's order:
allowed tokens -> min_tokens -> logit_bias -> repetition / frequency / presence penalties ->
temperature (0: greedy) -> min-p -> top-k -> top-p -> exponential-race draw.

Each request's parameters stay on the device in the state of its persistent batch row (sampling_state.py),
written when the request enters the row; a batch whose sequences hold no row (outside the engine) gets a
state for that call only. Which steps run is decided on the host from the requests' parameters, never
from device values, and the host waits for the device only to read the sampled ids (and the logprobs a
request asked for). An all-greedy batch without processors is one argmax.

`sample` returns the draw before the host reads it (PendingOutput: the ids stay on the device, their copy
to the host is started), so that an engine can launch the next step first; `__call__` waits for it."""

from dataclasses import dataclass
from typing import Protocol

import torch

from moeserve.layers.sampling_state import (FREQUENCY, GREEDY, MIN_P, PRESENCE, REPETITION, TEMPERATURE, TOP_K,
                                            TOP_P, HostCopy, PenaltyState, RowState, upload, uses_penalties,
                                            uses_processors)
from moeserve.sampling_params import Logprob, SamplingParams


class SampledSequence(Protocol):
    """What the sampler reads of a sequence (the engine's Sequence)."""

    params: SamplingParams
    generator: torch.Generator | None  # a seeded request's own stream
    block_row: int | None  # its persistent batch row, while it has one
    prompt_token_ids: list[int]

    @property
    def output_token_ids(self) -> list[int]: ...

    @property
    def num_output_tokens(self) -> int: ...


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]  # per row: top-N and the sampled token, when asked


@dataclass
class PendingOutput:
    """A SamplerOutput on its way to the host: the ids on the device, and the copies of them and of the packed
    logprob rows already started."""

    token_ids: torch.Tensor  # [S] long, on the device
    ids_copy: HostCopy
    logprobs_copy: HostCopy | None  # token_logprobs' packed rows of the rows asking
    asking: list[int]  # the rows that asked for logprobs
    num_top: list[int]  # how many top logprobs each of them asked for

    def wait(self) -> SamplerOutput:
        logprobs: list[dict[int, Logprob] | None] = [None] * len(self.token_ids)
        if self.logprobs_copy is not None:
            entries = unpack_token_logprobs(self.logprobs_copy.wait().tolist(), self.num_top)
            for i, entry in zip(self.asking, entries):
                logprobs[i] = entry
        return SamplerOutput(self.ids_copy.wait().tolist(), logprobs)


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int, max_rows: int | None = None):
        """max_rows: how many persistent batch rows the sequences' block_row values range over."""
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)  # for requests without a seed
        self.state = RowState(max_rows, vocab_size, self.device) if max_rows else None
        self.last_index: tuple[tuple[int, ...], torch.Tensor] | None = None  # the last step's rows, on the device

    def __call__(self, logits: torch.Tensor, seqs: list[SampledSequence],
                 eos_token_ids: tuple[int, ...]) -> SamplerOutput:
        return self.sample(logits, seqs, eos_token_ids).wait()

    def sample(self, logits: torch.Tensor, seqs: list[SampledSequence],
               eos_token_ids: tuple[int, ...]) -> PendingOutput:
        penalised = [i for i, seq in enumerate(seqs) if uses_penalties(seq.params)]
        if not penalised and all(seq.params.greedy and not uses_processors(seq.params) for seq in seqs):
            return self.output(logits, logits.argmax(dim=-1), seqs)  # rows enter their state on a later step
        state, rows = self.state_for(seqs)
        state.admit(seqs, rows, eos_token_ids)
        processed = [i for i, row in enumerate(rows) if state.processors[row] is not None]
        return self.output(*self.process_and_draw(logits, seqs, state, rows, processed, penalised), seqs)

    def process_and_draw(self, logits, seqs, state: RowState, rows: list[int], processed: list[int],
                         penalised: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The processed logits [S, V] and the ids drawn from them [S]."""
        slots = [state.penalties.slot_of_row[rows[i]] for i in penalised]
        rows_on_device, penalised_on_device, slots_on_device = self.device_index(rows, penalised, slots)
        columns = state.columns[rows_on_device]  # [S, C]
        logits = logits.to(torch.float32, copy=True)  # [S, V]
        self.apply_processors(logits, [(i, seqs[i], state.processors[rows[i]]) for i in processed])
        if penalised:
            every_row = len(penalised) == len(seqs)
            logits = apply_penalties(logits, columns, state.penalties, None if every_row else penalised_on_device,
                                     slots_on_device)
        logits = self.apply_temperature_and_truncation(logits, columns, [s.params for s in seqs if not s.params.greedy])
        token_ids = self.draw(logits, seqs, columns)  # [S]
        if penalised:
            state.penalties.record([rows[i] for i in penalised], slots_on_device, token_ids[penalised_on_device])
        return logits, token_ids

    def state_for(self, seqs: list[SampledSequence]) -> tuple[RowState, list[int]]:
        rows = [seq.block_row for seq in seqs]
        if self.state is not None and None not in rows:
            return self.state, rows
        return RowState(len(seqs), self.vocab_size, self.device), list(range(len(seqs)))

    def device_index(self, rows: list[int], penalised: list[int], slots: list[int]) -> list[torch.Tensor]:
        """The batch's rows [S], its penalised positions [P] and their penalty slots [P] on the device, in
        one copy; none when they are the previous step's (steady decode)."""
        key = (*rows, *penalised, *slots)
        if self.last_index is None or self.last_index[0] != key:
            self.last_index = key, upload(list(key), torch.long, self.device)
        return list(self.last_index[1].split([len(rows), len(penalised), len(slots)]))

    def apply_processors(self, logits, rows) -> None:
        for i, seq, processors in rows:
            if processors.disallowed is not None:
                logits[i].masked_fill_(processors.disallowed, float("-inf"))
            if processors.stop_ids is not None and seq.num_output_tokens < seq.params.min_tokens:
                logits[i].index_fill_(0, processors.stop_ids, float("-inf"))
            if processors.bias_ids is not None:
                logits[i].index_add_(0, processors.bias_ids, processors.bias_values)

    def apply_temperature_and_truncation(self, logits, columns, sampling: list[SamplingParams]):
        """Greedy rows keep their logits as they are (temperature 1, no truncation): argmax and logprobs
        then come from the penalised logits. `sampling`: the parameters of the rows that are not greedy."""
        if any(p.temperature != 1 for p in sampling):
            logits = logits / columns[:, TEMPERATURE, None]
        if any(p.min_p > 0 for p in sampling):
            probs = torch.softmax(logits, dim=-1)
            threshold = columns[:, MIN_P, None] * probs.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        if any(0 < p.top_k < self.vocab_size for p in sampling):
            logits = apply_top_k(logits, columns[:, TOP_K].long())
        if any(p.top_p < 1 for p in sampling):
            logits = apply_top_p(logits, columns[:, TOP_P])
        return logits

    def draw(self, logits: torch.Tensor, seqs: list[SampledSequence], columns: torch.Tensor) -> torch.Tensor:
        """Exponential race: argmax(p / q) with q ~ Exp(1) is an exact draw from p. A seeded request
        draws its q from its own generator, so its tokens do not depend on the rest of the batch."""
        greedy = [seq.params.greedy for seq in seqs]
        if all(greedy):
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.generator is not None and not greedy[i]:
                noise[i].exponential_(generator=seq.generator)
        sampled = (probs / noise).argmax(dim=-1)
        if not any(greedy):
            return sampled
        return torch.where(columns[:, GREEDY] > 0, logits.argmax(dim=-1), sampled)

    def output(self, logits: torch.Tensor, token_ids: torch.Tensor, seqs: list[SampledSequence]) -> PendingOutput:
        """The sampled ids, and the logprobs of the rows that asked for them, from the logits the draw used."""
        asking = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
        num_top = [seqs[i].params.logprobs for i in asking]
        packed = None
        if asking:
            chosen, asking_logits = token_ids, logits
            if len(asking) < len(seqs):
                index = upload(asking, torch.long, self.device)
                chosen, asking_logits = token_ids[index], logits[index]
            packed = pack_token_logprobs(torch.log_softmax(asking_logits.float(), dim=-1), chosen, num_top)
        return PendingOutput(token_ids, HostCopy(token_ids), HostCopy(packed) if packed is not None else None,
                             asking, num_top)


def apply_penalties(logits: torch.Tensor, columns: torch.Tensor, penalties: PenaltyState,
                    positions: torch.Tensor | None, slots: torch.Tensor) -> torch.Tensor:
    """Repetition divides the positive logits and multiplies the negative ones of every token seen in the
    prompt or the output; frequency and presence subtract for output tokens. positions: the penalised rows
    [P] (None: every row), slots: their penalty slots [P]."""
    rows = logits if positions is None else logits[positions]  # [P, V]
    parameters = columns if positions is None else columns[positions]  # [P, C]
    counts = penalties.counts[slots]  # [P, V]
    repetition = parameters[:, REPETITION, None]
    penalised = torch.where(rows > 0, rows / repetition, rows * repetition)
    rows = torch.where(penalties.in_prompt[slots] | (counts > 0), penalised, rows)
    rows -= parameters[:, FREQUENCY, None] * counts
    rows -= parameters[:, PRESENCE, None] * (counts > 0)
    if positions is None:
        return rows
    return logits.index_copy_(0, positions, rows)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    kth_largest = logits.sort(dim=-1, descending=True).values.gather(1, (top_k - 1)[:, None])
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    ascending, order = logits.sort(dim=-1)
    cumulative = torch.softmax(ascending, dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - top_p[:, None]
    drop[:, -1].fill_(False)  # the most likely token always stays
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def token_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: list[int]) -> list[dict[int, Logprob]]:
    """Per row: the chosen token's logprob and rank, and the top num_top[row] tokens'. One copy to the host."""
    return unpack_token_logprobs(pack_token_logprobs(logprobs, chosen, num_top).tolist(), num_top)


def pack_token_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: list[int]) -> torch.Tensor:
    """[n, 3 + 2k] on the device: ids, ranks and logprobs side by side in float64 (exact for all three)."""
    chosen_logprob = logprobs.gather(1, chosen[:, None])  # [n, 1]
    ranks = (logprobs > chosen_logprob).sum(dim=-1, keepdim=True) + 1  # [n, 1]
    k = max(max(num_top), 1)
    top_values, top_ids = logprobs.topk(k, dim=-1)  # [n, k]
    columns = (chosen[:, None], ranks, chosen_logprob, top_ids, top_values)
    return torch.cat([column.double() for column in columns], dim=1)


def unpack_token_logprobs(packed: list[list[float]], num_top: list[int]) -> list[dict[int, Logprob]]:
    k = max(max(num_top), 1)
    entries = []
    for row, n in zip(packed, num_top):
        entry = {int(token): Logprob(value, rank + 1) for rank, (token, value) in
                 enumerate(zip(row[3 : 3 + n], row[3 + k : 3 + k + n]))}
        entry[int(row[0])] = Logprob(row[2], int(row[1]))
        entries.append(entry)
    return entries
