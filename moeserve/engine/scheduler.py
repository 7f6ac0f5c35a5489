"""Continuous batching with chunked prefill under a token budget.

Each step: running sequences first, in arrival order (a decode takes one token, an unfinished prefill
what is left of the budget), then waiting ones, first come first served. When the cache runs out of
blocks, the newest running sequence is preempted: its blocks are freed and it is recomputed later.

Under async scheduling a sequence sampled in the step still in flight counts its pending token: its
next step computes that token (the runner takes its value on the device). One whose pending token is
its last by max_tokens is not scheduled again: it finishes whatever that token is.
"""

import time
from collections import deque

from moeserve.engine.block_manager import BlockManager
from moeserve.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def next_step_decodes(self) -> int | None:
        """How many sequences the next step computes if it computes one decode token each and nothing else (no
        sequence waits and none has prompt left), else None; a step may preempt some of them, never add others."""
        if self.waiting or any(seq.num_tokens - seq.num_computed_tokens > 1 for seq in self.running):
            return None
        return len(self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of its tokens to compute this step), decodes and prefill chunks mixed."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            if seq.num_output_tokens >= seq.max_tokens:  # its pending token ends it
                index += 1
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while self.block_manager.blocks_needed(seq, num_new) > self.block_manager.num_free_blocks:
                preempted = True
                if self.preempt_newest() is seq:
                    break
            if seq.status != Status.RUNNING:
                break
            self.block_manager.allocate(seq, num_new)
            scheduled.append((seq, num_new))
            budget -= num_new
            index += 1
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_new = self.admit(seq, budget)
            if num_new == 0:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.first_scheduled_time = seq.first_scheduled_time or time.monotonic()
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
        return scheduled

    def admit(self, seq: Sequence, budget: int) -> int:
        """Give a waiting sequence its cached prefix and blocks for its first chunk; 0 if they do not fit."""
        manager = self.block_manager
        reuse_prefix = seq.params.prompt_logprobs is None  # cached tokens would have no prompt logprobs
        prefix = manager.match_prefix(seq) if reuse_prefix else []
        num_new = min(seq.num_tokens - len(prefix) * manager.block_size, budget)
        num_blocks = -(-(len(prefix) * manager.block_size + num_new) // manager.block_size)
        if num_blocks - len(prefix) + manager.num_free_among(prefix) > manager.num_free_blocks:
            return 0
        manager.take_prefix(seq, prefix)
        manager.allocate(seq, num_new)
        return num_new

    def preempt_newest(self) -> Sequence:
        seq = self.running.pop()
        self.block_manager.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        return seq

    def finish(self, seq: Sequence) -> None:
        """Take a finished (or aborted) sequence out of the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = Status.FINISHED
