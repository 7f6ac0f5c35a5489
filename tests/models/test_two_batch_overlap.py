"""Two-batch overlap: a batch run as two micro-batches taking turns at every MoE exchange computes what it computes
as one (the engine's multi-rank runs: tests/distributed/test_lockstep_engine.py)."""

import pytest
import torch

import moeserve
from moeserve.layers.attention.metadata import AttentionMetadata
from moeserve.layers.stages import run, take_turns


def recording(name, steps, log):
    for i in range(steps):
        log.append(f"{name}{i}")
        yield
    log.append(f"{name}-end")
    return name


def test_micro_batches_take_turns_stage_by_stage_until_both_end():
    log = []
    assert take_turns(recording("a", 3, log), recording("b", 1, log)) == ("a", "b")
    assert log == ["a0", "b0", "a1", "b-end", "a2", "a-end"]
    assert run(recording("c", 2, [])) == "c"


@pytest.mark.parametrize("preset", ["tiny-deepseek-v3", "tiny-qwen2-moe", "tiny-llama4"])
@pytest.mark.parametrize("batch", [1, 3])
def test_two_micro_batches_compute_what_one_batch_does(preset, batch):
    model = moeserve.load_model(preset, progress=False)
    ids = torch.randint(3, 500, (batch, 9), generator=torch.Generator().manual_seed(batch))
    expected = model(ids)
    model.model.micro_batches = 2  # a batch of one sequence: the second micro-batch is empty
    actual = model(ids)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def metadata(query_lens, seq_lens, num_decodes):
    qsl = torch.tensor([0] + query_lens).cumsum(0).int()
    blocks = torch.arange(len(query_lens) * 3, dtype=torch.int32).view(len(query_lens), 3)
    return AttentionMetadata(num_decodes, qsl, torch.tensor(seq_lens, dtype=torch.int32), blocks,
                             torch.arange(sum(query_lens)) + 100, 16, query_lens, seq_lens)


def test_a_step_splits_at_a_sequence_boundary_near_half_its_tokens_else_inside_a_prefill_chunk():
    md = metadata([1, 1, 1, 7, 4], [9, 5, 30, 17, 20], num_decodes=3)
    assert md.halving_point() == 7  # the nearest boundary (10) is 3 tokens off half of 14: more than an eighth
    first, second = md.split(7)  # the 7-token chunk cut 4 | 3: one sequence in both parts
    assert (first.num_decodes, second.num_decodes) == (3, 0)
    assert first.query_lens_host == [1, 1, 1, 4] and second.query_lens_host == [3, 4]
    assert first.query_start_loc.tolist() == [0, 1, 2, 3, 7] and second.query_start_loc.tolist() == [0, 3, 7]
    assert first.seq_lens.tolist() == first.seq_lens_host == [9, 5, 30, 14]  # the first part's context ends earlier
    assert second.seq_lens.tolist() == second.seq_lens_host == [17, 20]  # the second attends to it through the cache
    assert first.block_table.tolist() == md.block_table[:4].tolist()
    assert second.block_table.tolist() == md.block_table[3:].tolist()
    assert first.slot_mapping.tolist() == list(range(100, 107)) and second.num_tokens == 7
    assert md.seq_lens.tolist() == [9, 5, 30, 17, 20] and md.query_start_loc.tolist()[-1] == 14  # untouched
    first, second = md.split(2)  # through the decodes: each part keeps its own
    assert (first.num_decodes, second.num_decodes) == (2, 1)
    assert second.query_start_loc.tolist() == [0, 1, 8, 12] and second.seq_lens_host == [30, 17, 20]
    assert metadata([1, 1, 1, 7, 6], [9, 5, 30, 17, 20], 3).halving_point() == 10  # 10 of 16: within an eighth
    one = metadata([6], [6], num_decodes=0)
    first, second = one.split(one.halving_point())
    assert first.query_lens_host == second.query_lens_host == [3] and second.seq_lens_host == [6]
    decode = metadata([1], [9], num_decodes=1)
    assert decode.halving_point() == 1 and decode.split(1)[1].num_tokens == 0  # one token: an empty second part
