"""Engine behaviour on the tiny models: prefix caching, abort, n > 1, seeds, stop conditions, logprobs."""

import random

import pytest
import torch

import moeserve
from moeserve.config import ConfigError
from moeserve.engine.args import EngineArgs
from moeserve.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-qwen3-moe", block_size=4)


def tokens(prompt_ids, llm, params=GREEDY):
    return llm.generate({"prompt_token_ids": prompt_ids}, params)[0].outputs[0].token_ids


def test_prefix_cache_hit_is_counted_and_changes_nothing(llm):
    manager = llm.engine.block_manager
    prefix = list(range(10, 30))  # 5 full blocks of 4
    first = tokens(prefix + [40, 41], llm)
    hits_before = manager.prefix_hits
    second = tokens(prefix + [50, 51, 52], llm)
    assert manager.prefix_hits - hits_before >= len(prefix)
    uncached = LLM("tiny-qwen3-moe", block_size=4, enable_prefix_caching=False)
    assert first == tokens(prefix + [40, 41], uncached)
    assert second == tokens(prefix + [50, 51, 52], uncached)
    assert uncached.engine.block_manager.prefix_hits == 0


def test_fully_cached_prompt_still_computes_its_last_token(llm):
    prompt = list(range(60, 76))  # exactly 4 blocks
    first = tokens(prompt, llm)
    hits_before = llm.engine.block_manager.prefix_hits
    assert tokens(prompt, llm) == first
    assert llm.engine.block_manager.prefix_hits - hits_before >= 12  # at least the first 3 blocks came from the cache


def test_abort_mid_generation_frees_every_block(llm):
    engine = llm.engine
    request_id = engine.add_request({"prompt_token_ids": list(range(5, 40))}, SamplingParams(max_tokens=50))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    output = engine.abort(request_id)
    assert output.finished and output.outputs[0].finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()


def test_seeded_request_is_reproducible_inside_different_batches(llm):
    seeded = SamplingParams(temperature=1.0, seed=99, max_tokens=12)
    alone = llm.generate({"prompt_token_ids": [7, 8, 9]}, seeded)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 20, 11)]
    batch = llm.generate(others + [{"prompt_token_ids": [7, 8, 9]}], [SamplingParams(temperature=1.0)] * 3 + [seeded])
    assert batch[3].outputs[0].token_ids == alone


def test_n_completions_come_back_indexed_and_differ(llm):
    output = llm.generate({"prompt_token_ids": [3, 4, 5, 6]}, SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=10))[0]
    assert [c.index for c in output.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1


def test_max_tokens_and_ignore_eos_give_exact_lengths(llm):
    params = SamplingParams(temperature=1.0, max_tokens=13, ignore_eos=True)
    for output in llm.generate([{"prompt_token_ids": [9] * n} for n in (1, 5, 9)], params):
        assert len(output.outputs[0].token_ids) == 13 and output.outputs[0].finish_reason == "length"


def test_stop_token_id_ends_the_completion(llm):
    free_run = tokens([11, 12, 13], llm, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    stop_at = free_run[4]
    stopped = llm.generate({"prompt_token_ids": [11, 12, 13]},
                           SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop_token_ids=[stop_at]))[0]
    completion = stopped.outputs[0]
    assert completion.token_ids == free_run[: free_run.index(stop_at) + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_at


def stop_across_tokens(llm, completion) -> str:
    """A stop string made of the end of one generated token's text and the start of the next one's."""
    pieces = [llm.engine.tokenizer.decode([t]) for t in completion.token_ids]
    i = next(i for i in range(2, len(pieces) - 1) if pieces[i].isprintable() and pieces[i + 1].isprintable()
             and "\ufffd" not in pieces[i] + pieces[i + 1] and pieces[i].strip() and pieces[i + 1].strip())
    return pieces[i][-1] + pieces[i + 1][:1]


def test_stop_string_across_tokens_is_cut_from_the_text(llm):
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    free_run = llm.generate("Hello", params)[0].outputs[0]
    stop = stop_across_tokens(llm, free_run)
    text = free_run.text
    expected_end = text.index(stop)
    result = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop]))[0]
    assert result.outputs[0].text == text[:expected_end]
    assert result.outputs[0].finish_reason == "stop" and result.outputs[0].stop_reason == stop
    kept = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop],
                                                include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == text[: expected_end + len(stop)]


def test_logprobs_of_greedy_tokens_match_the_model(llm):
    prompt = [20, 21, 22, 23]
    output = llm.generate({"prompt_token_ids": prompt},
                          SamplingParams(temperature=0.0, max_tokens=5, logprobs=2, prompt_logprobs=1))[0]
    completion = output.outputs[0]
    ids = torch.tensor([prompt + completion.token_ids], device=llm.engine.device)
    logprobs = torch.log_softmax(llm.engine.model(ids)[0].float(), dim=-1)  # [S, V]
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = logprobs[len(prompt) - 1 + i]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == 1
        assert len(entry) == 2  # the top 2, the greedy token among them
    assert output.prompt_logprobs[0] is None
    for i, entry in enumerate(output.prompt_logprobs[1:], start=1):
        assert entry[prompt[i]].logprob == pytest.approx(logprobs[i - 1, prompt[i]].item(), abs=1e-4)
    assert completion.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs)))


def test_prompt_logprobs_survive_chunked_prefill():
    small_budget = LLM("tiny-mixtral", max_num_batched_tokens=3)
    prompt = list(range(30, 41))
    output = small_budget.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    ids = torch.tensor([prompt], device=small_budget.engine.device)
    logprobs = torch.log_softmax(small_budget.engine.model(ids)[0], dim=-1)
    assert len(output.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        assert output.prompt_logprobs[i][prompt[i]].logprob == pytest.approx(logprobs[i - 1, prompt[i]].item(), abs=1e-4)


def test_request_errors_say_what_is_wrong(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.make_request({"prompt_token_ids": []})
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 512\)"):
        engine.make_request({"prompt_token_ids": [600]})
    with pytest.raises(ValueError, match="exceeds max_model_len=4096; lower max_tokens to at most 4093"):
        engine.make_request({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=5000))
    with pytest.raises(ValueError, match="the prompt has 4096 tokens; max_model_len is 4096"):
        engine.make_request({"prompt_token_ids": [5] * 4096})
    engine.add_request({"prompt_token_ids": [5]}, GREEDY, request_id="same")
    with pytest.raises(ValueError, match="request id 'same' is already in use"):
        engine.add_request({"prompt_token_ids": [5]}, GREEDY, request_id="same")
    engine.abort("same")


@pytest.mark.parametrize("field,value,message", [
    ("block_size", 3, "EngineArgs.block_size must be a power of two"),
    ("gpu_memory_utilization", 1.5, r"EngineArgs.gpu_memory_utilization must be in \(0, 1\]"),
    ("max_num_seqs", 0, "EngineArgs.max_num_seqs must be at least 1"),
    ("dtype", "int8", "EngineArgs.dtype must be one of auto, float32, bfloat16, float16"),
    ("quantization", "int4", "EngineArgs.quantization must be one of fp8, nvfp4, None"),
    ("ep_backend", "nccl", "EngineArgs.ep_backend must be one of auto, all_to_all, allgather"),
    ("device", "gpu", "EngineArgs.device must be auto, cpu, cuda or cuda:N"),
    ("ep", 0, "EngineArgs.ep must be an integer >= 1"),
])
def test_engine_arguments_are_checked(field, value, message):
    with pytest.raises(ConfigError, match=message):
        EngineArgs(model="tiny-mixtral", **{field: value})


def test_cache_smaller_than_one_request_is_refused():
    with pytest.raises(ConfigError, match="the KV cache holds 0 tokens, fewer than max_model_len=4096"):
        LLM("tiny-mixtral", kv_cache_memory=1000)


def test_incremental_detokenizer_never_emits_half_a_character():
    tokenizer = moeserve.load_tokenizer("tiny-mixtral")
    text = "é€😀 done"
    ids = tokenizer.encode(text)  # characters outside the tiny vocabulary are split into byte tokens
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    pieces = [detok.new_text(ids[: i + 1]) for i in range(len(ids))]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces.count("") >= 3  # held back while a character was incomplete


def brute_force_stop(text: str, new_from: int, stops: list[str]):
    """The earliest stop string ending within text[new_from:], and the longest stop prefix ending text."""
    ends = [(text.find(s, max(0, new_from - len(s) + 1)), s) for s in stops]
    found = min(((start, s) for start, s in ends if start != -1), default=None)
    partial = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return found, partial


@pytest.mark.parametrize("seed", range(6))
def test_stop_matcher_equals_brute_force_on_text_fed_in_pieces(seed):
    rng = random.Random(seed)
    alphabet = "ab" if seed % 2 else "abc"  # few letters: many overlapping partial matches
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
    matcher, text = StopMatcher(stops), ""
    for _ in range(40):
        new = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
        found = matcher.feed(new)
        text += new
        assert (found, matcher.partial_length) == brute_force_stop(text, len(text) - len(new), stops), (stops, text)
        if found is not None:
            break


def test_stop_matcher_examples():
    matcher = StopMatcher(["lo w", "xyz"])
    assert matcher.feed("hello") is None and matcher.partial_length == 2  # "lo" may become "lo w"
    assert matcher.feed(" world") == (3, "lo w")
    ending = StopMatcher(["end.", "ndx"])
    assert ending.feed("the end") is None and ending.partial_length == 3


def test_streamed_text_never_shows_a_possible_stop_string_prefix(llm):
    completion = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    free_run = completion.text
    stop = stop_across_tokens(llm, completion)  # its first character is visible a step before the rest
    engine = llm.engine
    request_id = engine.add_request("Hello", SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop]))
    seen = []
    while engine.has_unfinished_requests():
        seen += [o.outputs[0].text for o in engine.step() if o.request_id == request_id]
    final = seen[-1]
    assert final == free_run[: free_run.index(stop)]
    assert all(final.startswith(text) for text in seen)


def test_expert_load_counts_every_token_each_moe_layer_routes(llm):
    config, prompt = llm.engine.config, list(range(300, 306))  # ids no other test caches
    before = llm.engine.expert_load()
    llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    after = llm.engine.expert_load()
    assert sorted(after) == sorted(config.moe_layers)
    for layer, counts in after.items():
        assert len(counts) == config.moe.num_experts
        assert sum(counts) - sum(before[layer]) == (len(prompt) + 2) * config.moe.top_k  # the prefill, 2 decodes
