"""The start-up memory profile's batch: the whole token budget, in sequences short enough that dense
attention's scores (square in a sequence's length) stay far below what the flash kernels need."""

import pytest
import torch

from moeserve.engine.plan import PROFILE_SEQ_LEN, profile_batch_shape


@pytest.mark.parametrize("budget, max_model_len", [(16384, 163840), (16384, 4096), (8192, 8192), (100, 4096),
                                                   (5000, 1000), (3, 2), (2049, 10**6)])
def test_profile_batch_covers_the_budget_in_short_sequences(budget, max_model_len):
    batch, seq_len = profile_batch_shape(budget, max_model_len)
    assert batch * seq_len >= budget and (batch - 1) * seq_len < budget  # the budget, not a sequence more
    assert seq_len <= min(PROFILE_SEQ_LEN, max_model_len)


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2-lite", "tiny-qwen3-moe", "tiny-llama4"])
def test_the_profiled_step_runs_as_several_sequences(preset, monkeypatch):
    from moeserve import engine
    import moeserve.engine.plan  # noqa: F401
    from moeserve.engine.args import EngineArgs
    from moeserve.llm import LLM

    monkeypatch.setattr(engine.plan, "PROFILE_SEQ_LEN", 16)
    llm = LLM(preset)
    args = EngineArgs(model=preset, max_num_batched_tokens=40, max_num_seqs=8)
    probs = engine.memory.largest_step(llm.engine.model, args, 64, "cpu")  # 3 sequences of 14 tokens
    assert probs.shape == (8, llm.engine.config.vocab_size) and torch.isfinite(probs).all()
