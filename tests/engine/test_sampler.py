"""The sampler on fixed logits: distributions, penalties, processors, logprobs; and parameter checks."""

import math

import pytest
import torch

from moeserve.engine.sequence import Sequence
from moeserve.layers.sampler import Sampler
from moeserve.sampling_params import SamplingParams, SamplingParamsError

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0])
VOCAB = LOGITS.numel()
EOS = (7,)


def seq(params: SamplingParams, prompt=(0,), output=()) -> Sequence:
    s = Sequence("r", 0, list(prompt), params, max_tokens=100)
    s.token_ids += list(output)
    return s


def draw_counts(params: SamplingParams, num_draws: int = 40000, seed: int = 0) -> torch.Tensor:
    sampler = Sampler(VOCAB, torch.device("cpu"), seed)
    rows = [seq(params) for _ in range(num_draws)]
    tokens = sampler(LOGITS.expand(num_draws, VOCAB), rows, EOS).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=VOCAB).double()


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.09 is p = 0.001."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_distribution(counts: torch.Tensor, expected: torch.Tensor):
    expected = expected / expected.sum()
    assert (counts[expected == 0] == 0).all(), "a token outside the allowed set was drawn"
    support = expected > 0
    expected_counts = expected[support] * counts.sum()
    statistic = ((counts[support] - expected_counts) ** 2 / expected_counts).sum().item()
    assert statistic < chi_square_critical(int(support.sum()) - 1)


def softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.double(), dim=-1)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_draws_follow_softmax_of_scaled_logits(temperature):
    assert_distribution(draw_counts(SamplingParams(temperature=temperature)), softmax(LOGITS / temperature))


def test_top_k_keeps_the_k_most_likely():
    expected = softmax(LOGITS)
    expected[3:] = 0
    assert_distribution(draw_counts(SamplingParams(top_k=3)), expected)


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = softmax(LOGITS)
    keep = int((p.cumsum(0) < 0.8).sum()) + 1  # smallest prefix with cumulative >= 0.8
    expected = p.clone()
    expected[keep:] = 0
    assert_distribution(draw_counts(SamplingParams(top_p=0.8)), expected)


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    p = softmax(LOGITS)
    expected = torch.where(p >= 0.2 * p.max(), p, torch.zeros_like(p))
    assert_distribution(draw_counts(SamplingParams(min_p=0.2)), expected)


def test_combined_processors_apply_in_order():
    # temperature 0.7, then top-k 5, then top-p 0.9 on what is left
    p = softmax(LOGITS / 0.7)
    p[5:] = 0
    p = p / p.sum()
    keep = int((p.cumsum(0) < 0.9).sum()) + 1
    p[keep:] = 0
    assert_distribution(draw_counts(SamplingParams(temperature=0.7, top_k=5, top_p=0.9)), p)


def processed_logprobs(params: SamplingParams, prompt=(0,), output=()) -> torch.Tensor:
    params.logprobs = VOCAB
    entry = Sampler(VOCAB, torch.device("cpu"), 0)(LOGITS[None], [seq(params, prompt, output)], EOS).logprobs[0]
    return torch.tensor([entry[t].logprob for t in range(VOCAB)])


def test_penalties_on_a_hand_built_example():
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    # prompt has token 0; output has 1 twice and 3 once. Repetition divides positive logits and multiplies
    # negative ones of every seen token; frequency and presence subtract for output tokens only.
    expected = torch.tensor([2.0 / 2, 1.0 / 2 - 0.5 * 2 - 0.25, 0.5, 0.0 * 2 - 0.5 - 0.25, -0.5, -1.0, -2.0, -3.0])
    actual = processed_logprobs(params, prompt=(0,), output=(1, 1, 3))
    torch.testing.assert_close(actual, torch.log_softmax(expected, dim=-1))


def test_logit_bias_allowed_tokens_and_min_tokens():
    params = SamplingParams(temperature=0.0, logit_bias={6: 10.0}, allowed_token_ids=[1, 2, 6, 7], min_tokens=3)
    expected = LOGITS.clone()
    expected[6] += 10.0
    expected[[0, 3, 4, 5]] = float("-inf")  # not allowed
    expected[7] = float("-inf")  # EOS before min_tokens
    actual = processed_logprobs(params, output=(1,))
    torch.testing.assert_close(actual, torch.log_softmax(expected, dim=-1))


def test_logprobs_are_log_softmax_of_the_processed_logits():
    params = SamplingParams(temperature=0.7, top_k=4, logprobs=3)
    sampler = Sampler(VOCAB, torch.device("cpu"), 0)
    out = sampler(LOGITS[None], [seq(params)], EOS)
    expected = torch.log_softmax((LOGITS / 0.7).masked_fill(torch.arange(VOCAB) >= 4, float("-inf")), dim=-1)
    entry = out.logprobs[0]
    token = out.token_ids[0]
    assert set(entry) == {0, 1, 2} | {token}
    for t, logprob in entry.items():
        assert logprob.logprob == pytest.approx(expected[t].item(), abs=1e-5)
        assert logprob.rank == 1 + int((expected > expected[t]).sum())


def test_greedy_takes_the_argmax_and_ignores_truncation():
    sampler = Sampler(VOCAB, torch.device("cpu"), 0)
    params = SamplingParams(temperature=0.0, top_k=1, top_p=0.1, min_p=0.5, logprobs=3)
    out = sampler(LOGITS[None].repeat(50, 1), [seq(params)] * 50, EOS)
    assert out.token_ids == [0] * 50
    untruncated = torch.log_softmax(LOGITS, dim=-1)  # truncation would leave -inf beyond token 0
    for entry in out.logprobs:
        assert {t: round(lp.logprob, 5) for t, lp in entry.items()} == {t: round(untruncated[t].item(), 5) for t in (0, 1, 2)}


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    def seeded_draws(batch_size, position, steps=30):
        rows = [seq(SamplingParams()) for _ in range(batch_size)]
        rows[position] = seq(SamplingParams(seed=1234))
        rows[position].generator = torch.Generator().manual_seed(1234)
        sampler = Sampler(VOCAB, torch.device("cpu"), seed=batch_size)  # other rows: another stream
        return [sampler(LOGITS[None].repeat(batch_size, 1), rows, EOS).token_ids[position] for _ in range(steps)]

    alone = seeded_draws(1, 0)
    assert len(set(alone)) > 2
    assert seeded_draws(5, 2) == alone
    assert seeded_draws(9, 8) == alone


@pytest.mark.parametrize("field,value,message", [
    ("n", 0, "SamplingParams.n must be an integer in [1, 128]"),
    ("temperature", -0.1, "SamplingParams.temperature must be a finite number in [0.0, 100.0]"),
    ("top_p", 0.0, "SamplingParams.top_p must be in (0, 1]"),
    ("top_p", 1.5, "SamplingParams.top_p must be in (0, 1]"),
    ("top_k", -2, "SamplingParams.top_k must be 0 or -1 (off) or a positive integer"),
    ("min_p", 1.5, "SamplingParams.min_p must be a finite number in [0.0, 1.0]"),
    ("presence_penalty", 3.0, "SamplingParams.presence_penalty must be a finite number in [-2.0, 2.0]"),
    ("frequency_penalty", -2.5, "SamplingParams.frequency_penalty must be a finite number in [-2.0, 2.0]"),
    ("repetition_penalty", 0.0, "SamplingParams.repetition_penalty must be a finite number in [0.01, 100.0]"),
    ("repetition_penalty", float("inf"), "SamplingParams.repetition_penalty must be a finite number"),
    ("temperature", float("inf"), "SamplingParams.temperature must be a finite number"),
    ("temperature", float("nan"), "SamplingParams.temperature must be a finite number"),
    ("logit_bias", {5: float("nan")}, "SamplingParams.logit_bias values must be finite numbers"),
    ("seed", 2**63, "SamplingParams.seed must be an integer in [-9223372036854775808, 9223372036854775807]"),
    ("stop", ["x"] * 65, "SamplingParams.stop may hold at most 64 strings"),
    ("max_tokens", 0, "SamplingParams.max_tokens must be an integer in [1, inf]"),
    ("min_tokens", 20, "SamplingParams.min_tokens must be an integer in [0, 16]"),
    ("logprobs", 21, "SamplingParams.logprobs must be an integer in [0, 20]"),
    ("prompt_logprobs", -1, "SamplingParams.prompt_logprobs must be an integer in [0, 20]"),
    ("stop", [""], "SamplingParams.stop must be non-empty strings"),
    ("allowed_token_ids", [], "SamplingParams.allowed_token_ids must not be empty"),
    ("seed", 1.5, "SamplingParams.seed must be an integer in"),
])
def test_invalid_parameters_name_the_field_and_range(field, value, message):
    with pytest.raises(SamplingParamsError) as error:
        SamplingParams(**{field: value})
    assert str(error.value).startswith(message)


def test_token_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(SamplingParamsError, match=r"logit_bias: token id 99 is outside the vocabulary \[0, 8\)"):
        SamplingParams(logit_bias={99: 1.0}).check_token_ids(VOCAB)


def test_repetition_penalty_multiplies_negative_logits():
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    expected = LOGITS.clone()
    expected[5] = -1.0 * 1.5  # seen in the prompt
    expected[0] = 2.0 / 1.5  # seen in the output
    actual = processed_logprobs(params, prompt=(5,), output=(0,))
    torch.testing.assert_close(actual, torch.log_softmax(expected, dim=-1))
