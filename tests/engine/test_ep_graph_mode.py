"""The p2p EP backend's exchange mode per step: every rank predicts whether its next step computes decodes only,
the lockstep's exchange gives every rank all predictions, and all derive the same mode (low latency: every rank
replays a decode graph; high throughput: eager). A rank whose step contradicts the agreed mode first completes the
step's exchanges (an empty graph replay, as the others expect), then fails the step: the lockstep ends every rank."""

import random
from types import SimpleNamespace

import pytest

from moeserve.engine.block_manager import BlockManager
from moeserve.engine.lockstep import NEXT_DECODES, NOT_DECODES, low_latency_next
from moeserve.engine.model_runner import ModeMismatch, ModelRunner
from moeserve.engine.scheduler import Scheduler
from moeserve.engine.sequence import Sequence
from moeserve.sampling_params import SamplingParams


def sequence(prompt: int) -> Sequence:
    return Sequence(f"r{prompt}", 0, list(range(1, prompt + 1)), SamplingParams(), max_tokens=8)


def test_the_next_step_is_decodes_only_once_every_prompt_is_in_the_cache_and_nothing_waits():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=6)
    assert scheduler.next_step_decodes() == 0  # idle: an empty step replays the smallest graph
    long, short = sequence(9), sequence(3)
    scheduler.add(long)
    scheduler.add(short)
    assert scheduler.next_step_decodes() is None  # waiting prompts
    for seq, num_new in scheduler.schedule():  # 6 tokens: the long prompt's first chunk only
        seq.num_computed_tokens += num_new
    assert scheduler.next_step_decodes() is None  # a prompt chunk left, one sequence waiting
    while scheduler.waiting or any(s.num_computed_tokens < s.num_tokens for s in scheduler.running):
        for seq, num_new in scheduler.schedule():
            seq.num_computed_tokens += num_new
    for seq in scheduler.running:  # each samples its first token
        seq.token_ids.append(7)
    assert scheduler.next_step_decodes() == 2
    assert all(n == 1 for _, n in scheduler.schedule())  # as predicted


@pytest.mark.parametrize("rows, assignments, largest, expected", [
    ([[0] * 5 + [3], [0] * 5 + [0]], [], 8, True),  # decodes on one rank, nothing on the other
    ([[0] * 5 + [3], [0] * 5 + [NOT_DECODES]], [], 8, False),  # a prefill anywhere: every rank eager
    ([[0] * 5 + [9], [0] * 5 + [1]], [], 8, False),  # more decodes than the largest graph
    ([[0] * 5 + [2], [0] * 5 + [2]], [(1, "request")], 8, False),  # a new request's prefill comes next
])
def test_every_rank_derives_the_same_mode_from_the_exchanged_table(rows, assignments, largest, expected):
    assert all(len(row) == NEXT_DECODES + 1 for row in rows)
    assert low_latency_next(rows, assignments, largest) is expected


def runner(low_latency: bool | None, sizes=(1, 2, 4, 8)):
    """A ModelRunner's graph choice, with graphs of `sizes` and a p2p transport in the given mode (None: no EP)."""
    graphs = SimpleNamespace(sizes=list(sizes), size_for=lambda n: next((s for s in sizes if s >= n), None))
    transport = None if low_latency is None else SimpleNamespace(low_latency=low_latency)
    return SimpleNamespace(graphs=graphs, ep_transport=transport, decodes_only=ModelRunner.decodes_only)


def decodes(count: int):
    seqs = [sequence(3) for _ in range(count)]
    for seq in seqs:
        seq.num_computed_tokens = seq.num_tokens - 1
    return [(seq, 1) for seq in seqs]


def test_a_low_latency_step_replays_a_graph_and_a_high_throughput_one_runs_eagerly():
    assert ModelRunner.graph_size_for(runner(None), decodes(3)) == 4  # no EP: as ever
    assert ModelRunner.graph_size_for(runner(True), decodes(3)) == 4
    assert ModelRunner.graph_size_for(runner(False), decodes(3)) is None  # the ranks agreed on high throughput
    prefill = [(sequence(5), 5)]
    assert ModelRunner.graph_size_for(runner(None), prefill) is None
    with pytest.raises(RuntimeError, match="prediction was wrong"):  # an error on this rank, not a hang
        ModelRunner.graph_size_for(runner(True), prefill)
    with pytest.raises(RuntimeError, match="within the graphs"):
        ModelRunner.graph_size_for(runner(True), decodes(9))


def test_a_rank_that_contradicts_the_agreed_mode_completes_the_exchanges_before_it_fails():
    calls = []

    def contradicting(scheduled):
        raise ModeMismatch("the lockstep's decode prediction was wrong")

    fake = SimpleNamespace(balancer=None, graph_size_for=contradicting, execute_empty=lambda: calls.append("empty"))
    with pytest.raises(ModeMismatch):
        ModelRunner.execute(fake, [(sequence(5), 5)])
    assert calls == ["empty"]  # the smallest graph replayed: every other rank's barriers find this one


@pytest.mark.parametrize("seed", range(6))
def test_the_decode_prediction_holds_over_random_traffic_with_preemption(seed):
    """Random arrivals, prompt lengths and output lengths through a cache small enough to preempt: whenever
    next_step_decodes predicts n decodes, the next schedule() is decodes only, at most n of them."""
    rng = random.Random(seed)
    scheduler = Scheduler(BlockManager(12, 4, enable_prefix_caching=False), max_num_seqs=6, max_num_batched_tokens=16)
    predicted_steps = 0
    for step in range(200):
        if rng.random() < 0.2:
            seq = Sequence(f"r{step}", 0, [rng.randrange(1, 50) for _ in range(rng.randrange(1, 16))],
                           SamplingParams(), max_tokens=rng.randrange(1, 24))
            scheduler.add(seq)
        predicted = scheduler.next_step_decodes()
        scheduled = scheduler.schedule()
        if predicted is not None:
            predicted_steps += 1
            assert len(scheduled) <= predicted
            assert all(n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens for seq, n in scheduled)
        for seq, num_new in scheduled:
            seq.num_computed_tokens += num_new
            if seq.num_computed_tokens == seq.num_tokens:  # its prompt is in: it samples a token
                seq.token_ids.append(rng.randrange(1, 50))
                if seq.num_output_tokens >= seq.max_tokens:
                    scheduler.finish(seq)
    assert predicted_steps > 10 and scheduler.num_preemptions > 0  # the property was exercised, preemptions too
