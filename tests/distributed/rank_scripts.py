"""Functions the launch tests run on every rank (importable by spawned and torchrun processes)."""

import sys
import time
from collections import Counter

import torch
import torch.distributed as dist

from moeserve.distributed.launch import launch, make_context
from moeserve.distributed.layout import ParallelLayout
from moeserve.engine.lockstep import LockstepEngine
from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams

CONTROL_CALLS = ("all_gather", "all_gather_object", "all_reduce", "broadcast", "broadcast_object_list", "gather",
                 "gather_object", "scatter", "scatter_object_list", "reduce", "barrier",
                 "send", "recv", "isend", "irecv")
# (prompt, max_tokens): in a DP=2 layout the first goes to DP group 0, the second to DP group 1
COUNTED_REQUESTS = {"long": ("Hello", 8), "short": ("The router", 3)}


def fail_on_last_rank(context) -> None:
    if context.rank == dist.get_world_size() - 1:
        raise RuntimeError(f"rank {context.rank} failed on purpose")
    dist.all_reduce(torch.ones(1))  # the others wait here for the rank that never comes



def count_control_calls(control) -> Counter:
    """Wrap torch.distributed's collectives and point-to-point calls; count those on the control group."""
    calls = Counter()

    def counted(name, call):
        def wrapper(*args, **kwargs):
            if kwargs.get("group") is control or any(arg is control for arg in args):
                calls[name] += 1
            return call(*args, **kwargs)
        return wrapper

    for name in CONTROL_CALLS:
        setattr(dist, name, counted(name, getattr(dist, name)))
    return calls


def count_every_step(lockstep: LockstepEngine, calls: Counter) -> list[dict]:
    """The control calls of each lockstep step, as they happen."""
    per_step, step = [], lockstep.step

    def counted_step(stop=False):
        before = Counter(calls)
        try:
            return step(stop)
        finally:
            per_step.append(dict(calls - before))
    lockstep.step = counted_step
    return per_step


def counted_params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def single_engine_stream() -> list:
    """Every output of the counted requests, step by step, from one engine."""
    engine = LLM("tiny-deepseek-v3").engine
    for request_id, (prompt, max_tokens) in COUNTED_REQUESTS.items():
        engine.add(engine.make_request(prompt, counted_params(max_tokens), request_id))
    stream = []
    while engine.has_unfinished_requests():
        stream += engine.step()
    return stream


def lockstep_with_counted_calls(rank, world, tp, dp, ep):
    """An idle step, the step that assigns the counted requests, their decode steps, the stop step:
    (each step's control calls, rank 0's outputs, this rank's empty forwards)."""
    context = make_context(ParallelLayout(tp, dp, ep), "cpu", 60)
    llm = LLM("tiny-deepseek-v3", context=context, tp=tp, dp=dp, ep=ep)
    lockstep = llm.lockstep
    per_step = count_every_step(lockstep, count_control_calls(context.control))
    if not lockstep.is_coordinator:
        lockstep.follow()
        return per_step, None, llm.engine.runner.empty_steps
    lockstep.step()
    for request_id, (prompt, max_tokens) in COUNTED_REQUESTS.items():
        lockstep.submit(prompt, counted_params(max_tokens), request_id)
    stream = []
    while not lockstep.idle:
        stream += lockstep.step()[0]
    lockstep.step(stop=True)
    return per_step, stream, llm.engine.runner.empty_steps


def fail_after_a_forward(rank, world, failing_rank):
    """`failing_rank` raises after its third forward: (what each rank raised, seconds from there)."""
    llm = LLM("tiny-deepseek-v3", context=make_context(ParallelLayout(1, 2, 2), "cpu", 60), tp=1, dp=2, ep=2)
    lockstep, engine_step, forwards = llm.lockstep, llm.engine.step, []

    def failing_step(lockstep):
        outputs = engine_step(lockstep)
        forwards.append(time.monotonic())
        if rank == failing_rank and len(forwards) == 3:
            raise RuntimeError(f"rank {rank} failed on purpose")
        return outputs
    llm.engine.step = failing_step
    try:
        if lockstep.is_coordinator:
            lockstep.submit("Hello", counted_params(50), "a")
            for _ in range(10):  # the failure comes at the fourth step; without it: stop, return None
                lockstep.step()
            lockstep.step(stop=True)
        else:
            lockstep.follow()
    except Exception as error:
        return type(error).__name__, str(error), time.monotonic() - forwards[-1]
    return None


if __name__ == "__main__":  # under torchrun: python -m torch.distributed.run ... tests/distributed/rank_scripts.py TIMEOUT
    launch(ParallelLayout(dp=4, ep=4), "cpu", float(sys.argv[1]), fail_on_last_rank)
