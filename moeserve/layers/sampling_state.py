"""What the sampler keeps on the device per persistent batch row (the row a running sequence holds in the
block table): its request's parameter columns, the logit processors it asks for, and, for a request with
repetition / frequency / presence penalties, its output-token counts and prompt-token mask. A row's state
is written when a new request enters it; after that a step only reads it, and adds the sampled ids to the
penalty counts on the device."""

import logging
from dataclasses import dataclass

import torch

from moeserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# The columns of a row. A greedy row keeps its logits as they are: temperature 1, no truncation.
TEMPERATURE, MIN_P, TOP_K, TOP_P, REPETITION, FREQUENCY, PRESENCE, GREEDY = range(8)
NUM_COLUMNS = 8
FIRST_PENALTY_SLOTS = 8


def parameter_columns(params: SamplingParams, vocab_size: int) -> list[float]:
    greedy = params.greedy
    top_k = min(params.top_k, vocab_size) if params.top_k > 0 and not greedy else vocab_size
    return [1.0 if greedy else params.temperature, 0.0 if greedy else params.min_p, float(top_k),
            1.0 if greedy else params.top_p, params.repetition_penalty, params.frequency_penalty,
            params.presence_penalty, float(greedy)]


def uses_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1 or params.frequency_penalty != 0 or params.presence_penalty != 0


def uses_processors(params: SamplingParams) -> bool:
    return params.allowed_token_ids is not None or bool(params.logit_bias) or params.min_tokens > 0


def upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on the device, without the host waiting for the device: on CUDA through pinned memory
    in a non-blocking copy (the caching host allocator keeps the pinned block until the copy is done)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A device tensor's copy to the host, started without the host waiting (into pinned memory on CUDA);
    `wait` waits for this copy alone, not for the work queued after it."""

    def __init__(self, tensor: torch.Tensor):
        self.host = tensor.to("cpu", non_blocking=True)
        self.copied = None
        if tensor.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()

    def wait(self) -> torch.Tensor:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host


@dataclass
class RowProcessors:
    """The logit processors a row's request asks for, on the device; None where it asks for none."""

    disallowed: torch.Tensor | None  # [V] bool: outside allowed_token_ids
    bias_ids: torch.Tensor | None  # [N] long
    bias_values: torch.Tensor | None  # [N] float32
    stop_ids: torch.Tensor | None  # [N] long: ruled out before min_tokens


def row_processors(params: SamplingParams, eos_token_ids: tuple[int, ...], vocab_size: int,
                   device: torch.device) -> RowProcessors | None:
    disallowed = bias_ids = bias_values = stop_ids = None
    if params.allowed_token_ids is not None:
        disallowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
        disallowed.index_fill_(0, upload(params.allowed_token_ids, torch.long, device), False)
    if params.logit_bias:
        bias_ids = upload(list(params.logit_bias), torch.long, device)
        bias_values = upload(list(params.logit_bias.values()), torch.float32, device)
    stops = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))
    if params.min_tokens > 0 and stops:
        stop_ids = upload(stops, torch.long, device)
    if not uses_processors(params):
        return None
    return RowProcessors(disallowed, bias_ids, bias_values, stop_ids)


class PenaltyState:
    """Output-token counts [slots, V] (float32) and a prompt-token mask [slots, V] (bool): 5 bytes per
    vocabulary entry for each row whose request uses penalties, nothing for the others. Slots are given out
    per such row; the tensors are allocated on first use and double when full, up to max_slots (the number
    of rows), so they cost memory only while penalty requests run; that memory is not in the KV-cache plan,
    and running out of it raises an error that says what to lower."""

    def __init__(self, max_slots: int, vocab_size: int, device: torch.device):
        self.max_slots, self.vocab_size, self.device = max_slots, vocab_size, device
        self.counts = torch.zeros(0, vocab_size, device=device)  # [slots, V]
        self.in_prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)  # [slots, V]
        self.slot_of_row: dict[int, int] = {}
        self.counted: dict[int, int] = {}  # row -> output tokens its counts hold
        self.free_slots: list[int] = []

    def admit(self, row: int, prompt_token_ids: list[int], output_token_ids: list[int]) -> None:
        """Counts from scratch: the prompt mask once, the output tokens so far (after a preemption, say)."""
        slot = self.slot_of_row[row] if row in self.slot_of_row else self.take_slot()
        self.slot_of_row[row] = slot
        ids = upload(prompt_token_ids + output_token_ids, torch.long, self.device)
        num_prompt = len(prompt_token_ids)
        self.in_prompt[slot].fill_(False).index_fill_(0, ids[:num_prompt], True)
        self.counts[slot].zero_()
        self.counts[slot].index_add_(0, ids[num_prompt:], torch.ones(len(output_token_ids), device=self.device))
        self.counted[row] = len(output_token_ids)

    def release(self, row: int) -> None:
        if row in self.slot_of_row:
            self.free_slots.append(self.slot_of_row.pop(row))
            del self.counted[row]

    def record(self, rows: list[int], slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Add one sampled token per row to its counts, on the device. slots, token_ids: [P] long."""
        flat = slots * self.vocab_size + token_ids  # [P] into counts.view(-1)
        self.counts.view(-1).index_add_(0, flat, torch.ones(len(rows), device=self.device))
        for row in rows:
            self.counted[row] += 1

    def take_slot(self) -> int:
        if not self.free_slots:
            self.grow()
        return self.free_slots.pop()

    def grow(self) -> None:
        old = self.counts.shape[0]
        new = min(max(FIRST_PENALTY_SLOTS, 2 * old), self.max_slots)
        if new == old:
            raise RuntimeError(f"all {old} penalty rows are in use (a bug: there is one per batch row)")
        try:
            counts = torch.zeros(new, self.vocab_size, device=self.device)
            in_prompt = torch.zeros(new, self.vocab_size, dtype=torch.bool, device=self.device)
        except torch.OutOfMemoryError as error:
            raise RuntimeError(
                f"no memory for the penalty state of {new} requests ({new * self.vocab_size * 5 / 2**20:.0f} MiB: "
                f"5 bytes x vocabulary {self.vocab_size} per request using repetition/frequency/presence penalties): "
                "lower max_num_seqs or gpu_memory_utilization") from error
        counts[:old], in_prompt[:old] = self.counts, self.in_prompt
        self.counts, self.in_prompt = counts, in_prompt
        self.free_slots = list(range(new - 1, old - 1, -1)) + self.free_slots
        logger.info("Penalty state for %d requests: %.1f MiB", new, new * self.vocab_size * 5 / 2**20)


class RowState:
    """The device state of num_rows batch rows, and which sequence each row was written for."""

    def __init__(self, num_rows: int, vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, device
        self.columns = torch.zeros(num_rows, NUM_COLUMNS, device=device)  # [R, C]
        self.owner: list[object | None] = [None] * num_rows
        self.processors: list[RowProcessors | None] = [None] * num_rows
        self.penalties = PenaltyState(num_rows, vocab_size, device)

    @property
    def num_rows(self) -> int:
        return len(self.owner)

    def admit(self, seqs: list, rows: list[int], eos_token_ids: tuple[int, ...]) -> None:
        """Write the rows whose sequence changed; rebuild the penalty counts of a row that missed tokens."""
        entering = [(row, seq) for row, seq in zip(rows, seqs) if self.owner[row] is not seq]
        if entering:
            values = [parameter_columns(seq.params, self.vocab_size) for _, seq in entering]
            self.columns[upload([row for row, _ in entering], torch.long, self.device)] = \
                upload(values, torch.float32, self.device)
        for row, seq in entering:
            self.owner[row] = seq
            self.processors[row] = row_processors(seq.params, eos_token_ids, self.vocab_size, self.device)
            self.penalties.release(row)
        for row, seq in zip(rows, seqs):
            if uses_penalties(seq.params) and self.penalties.counted.get(row) != seq.num_output_tokens:
                self.penalties.admit(row, seq.prompt_token_ids, seq.output_token_ids)
