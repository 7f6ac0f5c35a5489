"""Data-parallel attention with expert-parallel MoE: one Engine per rank, all stepping together.

Rank 0 coordinates: it takes requests, checks them, and gives each to the least-loaded DP group
(by unfinished sequences). Every rank runs one forward per step, an empty one when it has nothing to
do, so that the MoE layers' collectives always have all ranks. The TP ranks of a DP group hold the
same requests and compute the same steps.

A step is: the forward (skipped on every rank when, at the last exchange, nobody had work and nothing
was assigned), then one exchange on the gloo control group, in which every rank gives a fixed row of
ints: its unfinished sequences, the size of its pickled outputs, whether its step failed, how many
decodes its next step computes if it computes nothing else; rank 0 adds the stop flag and the size of its
pickled message (assignments, aborts). From the decodes and the assignments every rank derives the
same exchange mode for the next forward under the p2p EP backend: low latency (all ranks replay decode
graphs) or high throughput (eager). One all_gather carries it
all: rank 0 needs every rank's row (loads, output sizes) and every rank needs rank 0's fields and
every load (to agree whether the next forward runs); a broadcast or a gather carries only one
direction. Bytes follow only where the table says so: the message, broadcast from rank 0, on steps
that have one; outputs, sent by the ranks that have any straight to rank 0. An idle step is one
all_gather; a steady decode step adds one send per DP group with outputs besides rank 0's.

Assignments made at the exchange run in the next step's forward, whose outputs come back at its own
exchange: no output waits for a later step. A rank whose step raises still joins the exchange (when
it got past the forward) and says so; then every rank raises at the same point and nobody waits.
"""

import pickle
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moeserve.distributed.launch import DistributedContext
from moeserve.engine.engine import Engine, Request
from moeserve.engine.outputs import RequestOutput
from moeserve.sampling_params import SamplingParams

# The columns of the control table, one row per rank.
LOAD, OUTPUT_BYTES, FAILED, STOP, MESSAGE_BYTES, NEXT_DECODES = range(6)  # STOP, MESSAGE_BYTES: rank 0's row only
NOT_DECODES = -1  # NEXT_DECODES of a rank whose next step is not decodes only


def low_latency_next(table: list[list[int]], assignments: list, largest_graph: int) -> bool:
    """Whether the next forward exchanges in low-latency mode (every rank replays a decode graph): every rank's next
    step computes decodes only, no more than the largest graph holds, and no new request comes in (its prefill)."""
    return not assignments and all(0 <= row[NEXT_DECODES] <= largest_graph for row in table)


class LockstepFailure(RuntimeError):
    """Another rank's step failed (its own log has the cause); every rank leaves the lockstep."""


@dataclass
class RequestSpec:
    """A checked request, as it travels from rank 0 to its DP group."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class StepMessage:
    assignments: list[tuple[int, RequestSpec]] = field(default_factory=list)  # (DP rank, request)
    aborts: list[str] = field(default_factory=list)


class LockstepEngine:
    def __init__(self, engine: Engine, context: DistributedContext):
        self.engine = engine
        self.context = context
        self.layout = context.groups.layout
        self.is_coordinator = context.rank == 0
        self.pending: list[RequestSpec] = []  # rank 0: checked, not yet assigned
        self.aborts: list[str] = []
        self.in_flight: set[str] = set()  # rank 0: assigned and not finished
        self.forward_next = False  # what the last exchange decided, alike on every rank
        self.dp_loads = [0] * self.layout.dp  # rank 0: as of the last exchange

    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Rank 0: check a request now (bad input raises here) and queue it for the next step."""
        return self.submit_request(self.engine.make_request(prompt, params, request_id))

    def submit_request(self, request: Request) -> str:
        """Rank 0: queue a checked request for the next step. An id whose abort is pending is free again."""
        in_use = self.in_flight - set(self.aborts) | {s.request_id for s in self.pending}
        if request.request_id in in_use:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.pending.append(RequestSpec(request.request_id, request.prompt, request.prompt_token_ids, request.params))
        return request.request_id

    def abort(self, request_id: str) -> None:
        self.aborts.append(request_id)

    @property
    def idle(self) -> bool:
        return not self.pending and not self.in_flight

    def step(self, stop: bool = False) -> tuple[list[RequestOutput], bool]:
        """One step on every rank: (outputs, on rank 0 only; whether to keep going). Requests submitted
        before it run from the next step on; `stop` (rank 0) ends every rank's loop after this step."""
        outputs, mine, error = self.forward()
        message = self.plan() if self.is_coordinator and not stop else None
        message_bytes = pickle.dumps(message) if message else b""
        table = self.exchange(len(mine), error is not None, stop, len(message_bytes))
        if error is not None:
            raise error
        failed = [rank for rank, row in enumerate(table) if row[FAILED]]
        if failed:
            raise LockstepFailure(f"rank {failed[0]} failed in its step; its log has the cause")
        if table[0][MESSAGE_BYTES]:
            received = self.broadcast_message(message_bytes, table[0][MESSAGE_BYTES])
            message = message or pickle.loads(received)
            self.apply(message)
        assignments = message.assignments if message else []
        self.forward_next = any(row[LOAD] for row in table) or bool(assignments)
        graphs = self.engine.runner.graphs
        self.engine.runner.set_ep_low_latency(graphs is not None and low_latency_next(table, assignments,
                                                                                    graphs.sizes[-1]))
        gathered = self.gather_outputs(outputs, mine, [row[OUTPUT_BYTES] for row in table])
        if self.is_coordinator:
            self.note_loads(table, assignments)
            self.in_flight -= {o.request_id for o in gathered if o.finished}
        return gathered, not table[0][STOP]

    def forward(self) -> tuple[list[RequestOutput], bytes, Exception | None]:
        """This rank's forward, when the last exchange said one runs: (outputs, those this rank sends
        pickled, an error kept until the exchange)."""
        if not self.forward_next:
            return [], b"", None
        try:
            outputs = self.engine.step(lockstep=True)
            return outputs, pickle.dumps(outputs) if outputs and self.context.groups.tp_rank == 0 else b"", None
        except Exception as error:
            return [], b"", error

    def plan(self) -> StepMessage | None:
        """Rank 0: assign the pending requests to the least-loaded DP groups (loads of the last exchange)."""
        if not self.pending and not self.aborts:
            return None
        dp_loads = list(self.dp_loads)  # a copy: note_loads counts what the ranks actually took
        message = StepMessage(aborts=self.aborts)
        self.in_flight -= set(self.aborts)
        for spec in self.pending:
            dp_rank = min(range(self.layout.dp), key=lambda d: dp_loads[d])
            dp_loads[dp_rank] += spec.params.n
            message.assignments.append((dp_rank, spec))
            self.in_flight.add(spec.request_id)
        self.pending, self.aborts = [], []
        return message

    def exchange(self, output_bytes: int, failed: bool, stop: bool, message_bytes: int) -> list[list[int]]:
        """The step's one collective, an all_gather of fixed rows: the table, a row per rank."""
        scheduler = self.engine.scheduler
        load = len(scheduler.waiting) + len(scheduler.running)
        decodes = scheduler.next_step_decodes()
        row = torch.tensor([load, output_bytes, failed, stop, message_bytes, NOT_DECODES if decodes is None else decodes],
                           dtype=torch.int64)  # columns as named
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, row, group=self.context.control)
        return torch.stack(rows).tolist()

    def note_loads(self, table: list[list[int]], assignments: list[tuple[int, RequestSpec]]) -> None:
        """Rank 0: each DP group's sequences (its first TP rank's count) with this step's assignments."""
        self.dp_loads = [row[LOAD] for row in table[::self.layout.tp]]
        for dp_rank, spec in assignments:
            self.dp_loads[dp_rank] += spec.params.n

    def broadcast_message(self, message_bytes: bytes, size: int) -> bytes:
        """Rank 0's pickled message to every rank (`size` bytes, from the table)."""
        if self.is_coordinator:
            buffer = torch.frombuffer(bytearray(message_bytes), dtype=torch.uint8)
        else:
            buffer = torch.empty(size, dtype=torch.uint8)
        dist.broadcast(buffer, src=0, group=self.context.control)
        return buffer.numpy().tobytes()

    def apply(self, message: StepMessage) -> None:
        for request_id in message.aborts:  # first: a new request may reuse an aborted one's id
            self.engine.abort(request_id)
        my_dp = self.context.groups.dp_rank
        for dp_rank, spec in message.assignments:
            if dp_rank == my_dp:
                prompt = {"prompt": spec.prompt, "prompt_token_ids": spec.prompt_token_ids}
                self.engine.add(self.engine.make_request(prompt, spec.params, spec.request_id))

    def gather_outputs(self, outputs: list[RequestOutput], mine: bytes, sizes: list[int]) -> list[RequestOutput]:
        """Rank 0: its outputs and, in rank order, those of the ranks whose size is not 0, sent to it."""
        if not self.is_coordinator:
            if mine:
                dist.send(torch.frombuffer(bytearray(mine), dtype=torch.uint8), dst=0, group=self.context.control)
            return []
        senders = [(rank, torch.empty(size, dtype=torch.uint8)) for rank, size in enumerate(sizes) if rank and size]
        receipts = [dist.irecv(buffer, src=rank, group=self.context.control) for rank, buffer in senders]
        for receipt in receipts:
            receipt.wait()
        received = [output for _, buffer in senders for output in pickle.loads(buffer.numpy().tobytes())]
        return outputs + received

    def follow(self) -> None:
        """Ranks other than 0: step until rank 0 says stop."""
        while self.step()[1]:
            pass
