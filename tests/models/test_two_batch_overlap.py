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


def test_a_step_splits_by_sequence_where_its_tokens_halve_and_keeps_decodes_first():
    md = metadata([1, 1, 1, 7, 4], [9, 5, 30, 7, 20], num_decodes=3)
    assert md.balanced_split() == 4  # 10 | 4 is closer than 3 | 11
    first, second = md.split(4)
    assert (first.num_decodes, second.num_decodes) == (3, 0)
    assert first.query_start_loc.tolist() == [0, 1, 2, 3, 10] and second.query_start_loc.tolist() == [0, 4]
    assert second.slot_mapping.tolist() == [110, 111, 112, 113] and first.num_tokens == 10
    assert second.block_table.tolist() == [[12, 13, 14]] and second.seq_lens.tolist() == [20]
    first, second = md.split(2)  # through the decodes: each part keeps its own
    assert (first.num_decodes, second.num_decodes) == (2, 1)
    assert second.query_start_loc.tolist() == [0, 1, 8, 12] and second.seq_lens_host == [30, 7, 20]
    one = metadata([6], [6], num_decodes=0)
    assert one.balanced_split() == 1 and one.split(1)[1].num_tokens == 0  # one sequence: an empty second part
