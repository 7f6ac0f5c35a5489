"""The sampler's per-row device state against a sampler that rebuilds everything each call, over many steps
of requests joining, leaving and being preempted out of rows that are then reused; penalties against the
formula written out; the greedy fast path against argmax."""

import copy
import random

import pytest
import torch

from moeserve.engine.sequence import Sequence
from moeserve.layers.sampler import Sampler
from moeserve.layers.sampling_state import parameter_columns, uses_penalties, uses_processors
from moeserve.sampling_params import SamplingParams

VOCAB = 24
EOS = (VOCAB - 1,)


def random_params(rng: random.Random) -> SamplingParams:
    kind = rng.choice(["greedy", "sample", "penalties", "greedy_penalties", "processors"])
    params = SamplingParams(max_tokens=100, temperature=0.0 if "greedy" in kind else rng.choice([0.6, 1.0, 1.3]),
                            top_k=rng.choice([0, 5]), top_p=rng.choice([1.0, 0.8]), min_p=rng.choice([0.0, 0.05]),
                            seed=rng.choice([None, rng.randrange(1000)]), logprobs=rng.choice([None, 2]))
    if "penalties" in kind:
        params.repetition_penalty = rng.choice([1.0, 0.8, 1.5])
        params.frequency_penalty = rng.choice([0.0, 0.7, -0.4])
        params.presence_penalty = rng.choice([0.3, -0.2])
    if kind == "processors":
        params.logit_bias = {rng.randrange(VOCAB): 3.0}
        params.allowed_token_ids = rng.sample(range(VOCAB), 12)
        params.min_tokens = 3
    return params


def new_sequence(rng: random.Random, number: int) -> Sequence:
    params = random_params(rng)
    seq = Sequence(f"r{number}", 0, [rng.randrange(VOCAB) for _ in range(rng.randint(1, 9))], params, max_tokens=100)
    if params.seed is not None:
        seq.generator = torch.Generator().manual_seed(params.seed)
    return seq


def rowless_copy(seq: Sequence) -> Sequence:
    """The same sequence without a row, with a copy of its generator's state."""
    twin = copy.copy(seq)
    twin.block_row = None
    if seq.generator is not None:
        twin.generator = torch.Generator().set_state(seq.generator.get_state())
    return twin


def assert_same_output(out, reference):
    assert out.token_ids == reference.token_ids
    for entry, expected in zip(out.logprobs, reference.logprobs):
        assert (entry is None) == (expected is None)
        if entry is not None:
            assert entry.keys() == expected.keys()
            for token, logprob in entry.items():
                assert logprob.rank == expected[token].rank
                torch.testing.assert_close(logprob.logprob, expected[token].logprob)  # NaN fails


def assert_state_matches_from_scratch(sampler: Sampler, batch: list[Sequence]):
    state = sampler.state
    for seq in batch:
        row = seq.block_row
        assert state.owner[row] is seq
        expected = torch.tensor(parameter_columns(seq.params, VOCAB))
        torch.testing.assert_close(state.columns[row], expected)
        if not uses_penalties(seq.params):
            assert row not in state.penalties.slot_of_row
            continue
        slot = state.penalties.slot_of_row[row]
        counts = torch.bincount(torch.tensor(seq.output_token_ids, dtype=torch.long), minlength=VOCAB).float()
        torch.testing.assert_close(state.penalties.counts[slot], counts)
        in_prompt = torch.zeros(VOCAB, dtype=torch.bool)
        in_prompt[seq.prompt_token_ids] = True
        assert torch.equal(state.penalties.in_prompt[slot], in_prompt)
    slots = list(state.penalties.slot_of_row.values())
    assert len(slots) == len(set(slots)), "two rows share a penalty slot"


@pytest.mark.parametrize("seed", range(4))
def test_row_state_equals_a_from_scratch_sampler_as_rows_are_reused(seed):
    rng = random.Random(seed)
    num_rows = 5
    sampler, reference = Sampler(VOCAB, torch.device("cpu"), 7, max_rows=num_rows), Sampler(VOCAB, "cpu", 7)
    free_rows, running, preempted, number = list(range(num_rows)), [], [], 0
    counted_from_scratch = set()
    admit = sampler.state.penalties.admit
    sampler.state.penalties.admit = lambda row, *lists: (counted_from_scratch.add(row), admit(row, *lists))
    for step in range(80):
        while free_rows and rng.random() < 0.6:  # join (a new request, or a preempted one coming back)
            seq = preempted.pop() if preempted and rng.random() < 0.5 else new_sequence(rng, number := number + 1)
            seq.block_row = free_rows.pop(rng.randrange(len(free_rows)))
            running.append(seq)
        if not running:
            continue
        batch = rng.sample(running, len(running))
        logits = torch.randn(len(batch), VOCAB) * 3
        expected = reference(logits, [rowless_copy(s) for s in batch], EOS)
        entering = {s.block_row for s in batch if uses_penalties(s.params) and sampler.state.owner[s.block_row] is not s}
        counted_from_scratch.clear()
        out = sampler(logits, batch, EOS)
        assert_same_output(out, expected)
        assert counted_from_scratch == entering, "penalty counts rebuilt on the host for a row already in place"
        for seq, token in zip(batch, out.token_ids):
            seq.token_ids.append(token)
        if not all(s.params.greedy and not uses_penalties(s.params) and not uses_processors(s.params) for s in batch):
            assert_state_matches_from_scratch(sampler, batch)  # (the greedy fast path writes no state)
        for seq in list(running):  # leave: finished, or preempted (to come back into any free row)
            if rng.random() < 0.15:
                running.remove(seq)
                free_rows.append(seq.block_row)
                seq.block_row = None
                if rng.random() < 0.5:
                    preempted.append(seq)


def old_penalised_logits(logits, prompt, output, repetition, frequency, presence):
    """The formula as the sampler had it: counts rebuilt from the token lists."""
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=VOCAB).float()
    seen = (counts > 0) | (torch.bincount(torch.tensor(prompt, dtype=torch.long), minlength=VOCAB) > 0)
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    return torch.where(seen, penalised, logits) - frequency * counts - presence * (counts > 0)


@pytest.mark.parametrize("seed", range(3))
def test_penalties_match_the_formula_on_random_rows(seed):
    rng = random.Random(seed)
    sampler = Sampler(VOCAB, torch.device("cpu"), 0, max_rows=8)
    seqs, expected = [], []
    logits = torch.randn(8, VOCAB) * 4
    for row in range(8):
        params = SamplingParams(temperature=0.0, repetition_penalty=rng.uniform(0.5, 2.0),
                                frequency_penalty=rng.uniform(-2, 2), presence_penalty=rng.uniform(-2, 2))
        params.logprobs = VOCAB  # every token's logprob (beyond MAX_LOGPROBS, past the check)
        if row % 3 == 0:
            params.repetition_penalty, params.frequency_penalty, params.presence_penalty = 1.0, 0.0, 0.0
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))]
        seq = Sequence("r", 0, prompt, params, max_tokens=100)
        seq.token_ids += [rng.randrange(VOCAB) for _ in range(rng.randint(0, 40))]
        seq.block_row = row
        seqs.append(seq)
        expected.append(old_penalised_logits(logits[row], prompt, seq.output_token_ids, params.repetition_penalty,
                                             params.frequency_penalty, params.presence_penalty))
    out = sampler(logits, seqs, EOS)
    for entry, row_expected in zip(out.logprobs, expected):
        actual = torch.tensor([entry[t].logprob for t in range(VOCAB)])
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual, torch.log_softmax(row_expected, dim=-1))
    assert out.token_ids == [int(e.argmax()) for e in expected]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_fast_path_is_the_argmax(dtype):
    sampler = Sampler(VOCAB, torch.device("cpu"), 0, max_rows=16)
    seqs = [Sequence("r", i, [1, 2], SamplingParams(temperature=0.0), max_tokens=10) for i in range(16)]
    for row, seq in enumerate(seqs):
        seq.block_row = row
    for _ in range(5):
        logits = (torch.randn(16, VOCAB) * 5).to(dtype)
        assert sampler(logits, seqs, EOS).token_ids == logits.float().argmax(dim=-1).tolist()
    assert sampler.last_index is None and sampler.state.owner == [None] * 16, "the fast path did more than argmax"
    assert sampler.state.penalties.counts.shape[0] == 0


def test_penalty_state_is_allocated_only_for_penalty_requests():
    sampler = Sampler(VOCAB, torch.device("cpu"), 0, max_rows=20)
    plain = [Sequence("p", i, [1], SamplingParams(temperature=0.7, top_k=4), max_tokens=10) for i in range(10)]
    penalised = [Sequence("q", i, [1], SamplingParams(frequency_penalty=0.5), max_tokens=10) for i in range(10)]
    for row, seq in enumerate(plain + penalised):
        seq.block_row = row
    sampler(torch.randn(10, VOCAB), plain, EOS)
    assert sampler.state.penalties.counts.shape[0] == 0
    sampler(torch.randn(3, VOCAB), penalised[:3], EOS)
    assert sampler.state.penalties.counts.shape[0] == 8  # first allocation
    sampler(torch.randn(10, VOCAB), penalised, EOS)
    assert sampler.state.penalties.counts.shape[0] == 16  # doubled, capped by the rows
    assert len(sampler.state.penalties.slot_of_row) == 10


def test_nan_logits_do_not_come_back_as_finite_logprobs():
    """The sampler does not hide a broken forward: a NaN row gives NaN logprobs, never a plausible number."""
    sampler = Sampler(VOCAB, torch.device("cpu"), 0, max_rows=2)
    seqs = [Sequence("r", i, [1], SamplingParams(temperature=0.8, frequency_penalty=0.3, logprobs=1), max_tokens=10)
            for i in range(2)]
    for row, seq in enumerate(seqs):
        seq.block_row = row
    logits = torch.randn(2, VOCAB)
    logits[1, 3] = float("nan")
    out = sampler(logits, seqs, EOS)
    assert all(torch.isfinite(torch.tensor(lp.logprob)) for lp in out.logprobs[0].values())
    assert any(torch.isnan(torch.tensor(lp.logprob)) for lp in out.logprobs[1].values())


def test_penalised_seeded_requests_keep_their_tokens_through_preemption():
    """Four penalised, seeded requests in a cache too small for them (preempted, rows reused) give the tokens
    each gives alone."""
    from moeserve.engine.kv_cache import bytes_per_block
    from moeserve.llm import LLM
    from moeserve.loader.model_loader import load_config

    prompts = [{"prompt_token_ids": [(5 * i + j) % 80 + 1 for j in range(4 + 6 * i)]} for i in range(4)]
    params = [SamplingParams(temperature=1.0, seed=10 + i, max_tokens=20, repetition_penalty=1.4,
                             frequency_penalty=0.6, presence_penalty=0.3 * i) for i in range(4)]
    roomy = LLM("tiny-qwen3-moe", block_size=4, max_model_len=64)
    alone = [roomy.generate(prompt, p)[0].outputs[0].token_ids for prompt, p in zip(prompts, params)]
    kv_bytes = bytes_per_block(load_config("tiny-qwen3-moe"), 4, torch.float32) * 14
    tight = LLM("tiny-qwen3-moe", block_size=4, max_model_len=44, kv_cache_memory=kv_bytes, max_num_seqs=3)
    together = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert together == alone
