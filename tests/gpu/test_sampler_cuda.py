"""The sampler on CUDA: a step waits for the device once for the sampled ids (and once for the logprobs
when asked), admissions included; its penalised logprobs and greedy tokens equal the CPU sampler's."""

import warnings

import pytest
import torch

from moeserve.engine.sequence import Sequence
from moeserve.layers.sampler import Sampler
from moeserve.layers.sampling_state import HostCopy
from moeserve.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

VOCAB = 1000
EOS = (999,)
MIXED = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=50, seed=3),
         SamplingParams(temperature=1.0, top_p=0.9, min_p=0.02), SamplingParams(temperature=0.0, repetition_penalty=1.3),
         SamplingParams(temperature=0.7, frequency_penalty=0.5, presence_penalty=0.2, seed=4),
         SamplingParams(temperature=1.1, logit_bias={5: 2.0}, allowed_token_ids=list(range(100)), min_tokens=4)]


def sequences(params_list, device, first_row=0):
    seqs = []
    for i, params in enumerate(params_list):
        seq = Sequence(f"r{i}", 0, list(range(i, i + 20)), params, max_tokens=100)
        seq.block_row = first_row + i
        if params.seed is not None:
            seq.generator = torch.Generator(device=device).manual_seed(params.seed)
        seqs.append(seq)
    return seqs


SYNC_WARNING = "called a synchronizing CUDA operation"  # not the mode's one-off "prototype" notice


def count_waits(step, monkeypatch) -> tuple[list[str], int]:
    """The synchronizing calls the sync debug mode saw during step (it cannot see an event's synchronize),
    and how many device-to-host copies the host waited for (each through its own event)."""
    waits = []
    original = HostCopy.wait
    monkeypatch.setattr(HostCopy, "wait", lambda copy: waits.append(1) or original(copy))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setattr(HostCopy, "wait", original)
    return [str(w.message)[:200] for w in caught if SYNC_WARNING in str(w.message)], len(waits)


WITH_LOGPROBS = MIXED + [SamplingParams(temperature=0.9, logprobs=3), SamplingParams(temperature=0.0, logprobs=0)]


@pytest.mark.parametrize("params_list,copies", [([SamplingParams(temperature=0.0)] * 8, 1), (MIXED, 1),
                                                (WITH_LOGPROBS, 2)], ids=["greedy", "mixed", "logprobs"])
def test_a_step_waits_for_the_device_only_for_the_ids(params_list, copies, monkeypatch):
    """copies: the ids, and the logprobs when a request asks for them. The first step admits the rows, the
    last one sees rows leave and join."""
    device = torch.device("cuda")
    sampler = Sampler(VOCAB, device, 0, max_rows=16)
    seqs = sequences(params_list, device)
    torch.cuda.synchronize()

    def step():
        logits = torch.randn(len(seqs), VOCAB, device=device, dtype=torch.bfloat16)
        for seq, token in zip(seqs, sampler(logits, seqs, EOS).token_ids):
            seq.token_ids.append(token)

    for _ in range(4):
        assert count_waits(step, monkeypatch) == ([], copies)
    newcomers = sequences(params_list[:2], device, first_row=len(params_list))
    seqs = seqs[1:] + newcomers
    assert count_waits(step, monkeypatch) == ([], copies)


def test_penalised_logprobs_and_greedy_tokens_equal_the_cpu_sampler():
    params_list = [SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=-0.3,
                                  logprobs=5, logit_bias={7: 1.5}, min_tokens=2) for _ in range(4)]
    params_list += [SamplingParams(temperature=0.0, logprobs=3)]
    outputs = {}
    for name in ("cpu", "cuda"):
        device = torch.device(name)
        sampler = Sampler(VOCAB, device, 0, max_rows=8)
        seqs = sequences(params_list, device)
        generator = torch.Generator().manual_seed(0)
        steps = []
        for _ in range(6):
            logits = torch.randn(len(seqs), VOCAB, generator=generator).to(device)
            out = sampler(logits, seqs, EOS)
            for seq, token in zip(seqs, out.token_ids):
                seq.token_ids.append(token)
            steps.append(out)
        outputs[name] = steps
    for cpu, cuda in zip(outputs["cpu"], outputs["cuda"]):
        assert cuda.token_ids == cpu.token_ids
        for cpu_entry, cuda_entry in zip(cpu.logprobs, cuda.logprobs):
            assert cuda_entry.keys() == cpu_entry.keys()
            for token in cpu_entry:
                torch.testing.assert_close(cuda_entry[token].logprob, cpu_entry[token].logprob, rtol=1e-4, atol=1e-4)
