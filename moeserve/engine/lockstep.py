"""Data-parallel attention with expert-parallel MoE: one Engine per rank, all stepping together.

Rank 0 coordinates: it takes requests, checks them, and gives each to the least-loaded DP group
(by unfinished sequences); every step it broadcasts the new assignments and aborts, every rank adds
the requests of its DP group, and every rank runs one forward, an empty one when it has nothing to
do, so that the MoE layers' collectives always have all ranks. The TP ranks of a DP group hold the
same requests and compute the same steps. Outputs are gathered to rank 0.
"""

from dataclasses import dataclass, field

import torch.distributed as dist

from moeserve.distributed.launch import DistributedContext
from moeserve.engine.engine import Engine, Request
from moeserve.engine.outputs import RequestOutput
from moeserve.sampling_params import SamplingParams


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
    stop: bool = False


class LockstepEngine:
    def __init__(self, engine: Engine, context: DistributedContext):
        self.engine = engine
        self.context = context
        self.layout = context.groups.layout
        self.is_coordinator = context.rank == 0
        self.pending: list[RequestSpec] = []  # rank 0: checked, not yet assigned
        self.aborts: list[str] = []
        self.in_flight: set[str] = set()  # rank 0: assigned and not finished

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
        """One step on every rank: (outputs, on rank 0 only; whether to keep going)."""
        loads = [None] * dist.get_world_size()
        dist.all_gather_object(loads, len(self.engine.scheduler.waiting) + len(self.engine.scheduler.running),
                               group=self.context.control)
        message = [self.plan(loads, stop) if self.is_coordinator else None]
        dist.broadcast_object_list(message, src=0, group=self.context.control)
        message = message[0]
        if message.stop:
            return [], False
        for request_id in message.aborts:  # first: a new request may reuse an aborted one's id
            self.engine.abort(request_id)
        my_dp = self.context.groups.dp_rank
        for dp_rank, spec in message.assignments:
            if dp_rank == my_dp:
                self.engine.add(self.engine.make_request({"prompt": spec.prompt, "prompt_token_ids": spec.prompt_token_ids},
                                                         spec.params, spec.request_id))
        if not any(loads) and not message.assignments:  # nobody has work: every rank knows it, skip the forward
            return [], True
        outputs = self.engine.step(lockstep=True)
        gathered = [None] * dist.get_world_size() if self.is_coordinator else None
        mine = outputs if self.context.groups.tp_rank == 0 else []
        dist.gather_object(mine, gathered, dst=0, group=self.context.control)
        if not self.is_coordinator:
            return [], True
        merged = [output for part in gathered for output in part]
        self.in_flight -= {o.request_id for o in merged if o.finished}
        return merged, True

    def plan(self, loads: list[int], stop: bool) -> StepMessage:
        dp_loads = [loads[d * self.layout.tp] for d in range(self.layout.dp)]
        message = StepMessage(aborts=self.aborts, stop=stop)
        self.in_flight -= set(self.aborts)
        for spec in self.pending:
            dp_rank = min(range(self.layout.dp), key=lambda d: dp_loads[d])
            dp_loads[dp_rank] += spec.params.n
            message.assignments.append((dp_rank, spec))
            self.in_flight.add(spec.request_id)
        self.pending, self.aborts = [], []
        return message

    def follow(self) -> None:
        """Ranks other than 0: step until rank 0 says stop."""
        while self.step()[1]:
            pass
