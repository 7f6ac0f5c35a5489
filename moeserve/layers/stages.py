"""Forwards as generators of stages, so that two micro-batches can take turns: a module's `stages(...)` runs its
forward and yields wherever it has sent tokens to other ranks and waits for them (an expert-parallel exchange), so
the other micro-batch's compute fills the wait; its return value is the forward's output."""

from collections.abc import Generator
from typing import Any

Stages = Generator[None, None, Any]


def run(stages: Stages):
    """One micro-batch: every stage in order; the return value."""
    while True:
        try:
            next(stages)
        except StopIteration as done:
            return done.value


def take_turns(*stages: Stages) -> tuple:
    """Micro-batches (the engine runs two): a stage of each in turn, until all end (each rank runs them in the same
    order, so their exchanges pair up across ranks); their return values."""
    results, running = [None] * len(stages), list(stages)
    while any(s is not None for s in running):
        for i, stages in enumerate(running):
            if stages is None:
                continue
            try:
                next(stages)
            except StopIteration as done:
                results[i], running[i] = done.value, None
    return tuple(results)
