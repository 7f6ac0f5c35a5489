"""Inputs that once broke the server (issue 11's list), each against a real uvicorn server: every one
gets a 4xx in OpenAI's error shape, naming the field, or is served correctly."""

import itertools
import json
import threading

import httpx
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moeserve.engine.detokenizer import StopMatcher
from moeserve.engine.engine import prompt_chars_bound
from moeserve.loader.checkpoint import CheckpointError, CheckpointReader
from moeserve.loader.presets import materialize
from moeserve.server.app import ServerConfig
from moeserve.server.serve import ListenOptions, ready_message
from tests.server.harness import (MODEL, checkpoint_with_tokenizer, headers, start_server, stop_server,
                                  wait_until_idle)


def post(server, path, body, **kwargs):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, timeout=60,
                      headers={**headers(), "Content-Type": "application/json"}, **kwargs)


def assert_openai_error(response, status, param=None, contains=""):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert error["param"] == param and contains in error["message"], error


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (not JSON, though Python writes them)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def all_numbers(node):
    if isinstance(node, dict):
        return [n for value in node.values() for n in all_numbers(value)]
    if isinstance(node, list):
        return [n for value in node for n in all_numbers(value)]
    return [node] if isinstance(node, float) else []


TRUNCATING = [{"top_k": 1}, {"top_p": 0.05}, {"min_p": 0.9}]


@pytest.mark.parametrize("truncation", TRUNCATING)
def test_1_logprobs_with_truncation_are_finite_json(server, truncation):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "logprobs": 5, "temperature": 1.0, **truncation}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200
    top = strict_json(response.text)["choices"][0]["logprobs"]["top_logprobs"]
    assert -9999.0 in [v for entry in top for v in entry.values()]  # the tokens truncation ruled out
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logprobs": True,
            "top_logprobs": 5, **truncation}
    response = post(server, "/v1/chat/completions", chat)
    assert response.status_code == 200 and all(v >= -9999.0 for v in all_numbers(strict_json(response.text)))
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, headers=headers()) as stream:
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert events and all(all(v >= -9999.0 for v in all_numbers(strict_json(e))) for e in events)


def test_2_lone_surrogates_are_refused(server):
    body = '{"model": "%s", "prompt": "\\ud800abc"}' % MODEL  # a JSON escape that is not a character
    assert_openai_error(post(server, "/v1/completions", body), 400, "prompt", "lone surrogate")
    chat = '{"model": "%s", "messages": [{"role": "user", "content": "a\\udfffb"}]}' % MODEL
    assert_openai_error(post(server, "/v1/chat/completions", chat), 400, "messages.0.content", "lone surrogate")
    tokenize = '{"model": "%s", "prompt": "\\ud800"}' % MODEL
    assert_openai_error(post(server, "/tokenize", tokenize), 400, "prompt", "lone surrogate")
    stop = '{"model": "%s", "prompt": "x", "stop": ["ok", "\\ud800"]}' % MODEL
    assert_openai_error(post(server, "/v1/completions", stop), 400, "stop", "lone surrogate")
    for path, fields in [("/v1/completions", '"prompt": "x"'),
                         ("/v1/chat/completions", '"messages": [{"role": "user", "content": "x"}]'),
                         ("/tokenize", '"prompt": "x"'), ("/detokenize", '"tokens": [1]')]:
        response = post(server, path, '{"model": "\\ud800x", %s}' % fields)  # echoed in the message
        assert_openai_error(response, 400, "model", "the model '\\ud800x' does not exist")


@pytest.mark.parametrize("text", [5, None, ["a"]])
def test_3_a_content_part_whose_text_is_not_a_string(server, text):
    body = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
    response = post(server, "/v1/chat/completions", body)
    assert_openai_error(response, 400, "messages.0.content")


def test_4_a_huge_prompt_is_refused_before_tokenizing_and_never_blocks_the_loop(server):
    huge = {"model": MODEL, "prompt": "word " * 150_000}  # 750 kB: over what 4096 tokens can hold
    assert_openai_error(post(server, "/v1/completions", huge), 400, "prompt", "characters, more than the 4096 tokens")
    core = server.engine.engine
    entered, release = threading.Event(), threading.Event()
    original = core.encode

    def slow_encode(*args, **kwargs):  # a tokenization that takes as long as the test wants
        entered.set()
        release.wait(60)
        return original(*args, **kwargs)

    core.encode = slow_encode
    try:
        result = {}
        sender = threading.Thread(target=lambda: result.setdefault("r", post(server, "/v1/completions",
                                                                             {"model": MODEL, "prompt": "Hi", "max_tokens": 2})))
        sender.start()
        assert entered.wait(30)
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # answered while it tokenizes
    finally:
        release.set()
        core.encode = original
    sender.join(60)
    assert result["r"].status_code == 200


def whitespace_word_tokenizer():
    """Words split at whitespace, which the pre-tokenizer drops: 30,000 spaces are no token at all."""
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def tiny_tokenizer_with(normalizer):
    tokenizer = Tokenizer.from_file(str(materialize(MODEL) / "tokenizer.json"))  # byte-level BPE
    tokenizer.normalizer = normalizer
    return tokenizer


@pytest.mark.parametrize("make_tokenizer,bounded", [
    (lambda: tiny_tokenizer_with(None), True),
    (lambda: tiny_tokenizer_with(normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase()])), True),
    (lambda: tiny_tokenizer_with(normalizers.Strip()), False),
    (lambda: tiny_tokenizer_with(normalizers.NFKC()), False),  # composes "e" + U+0301 into one character
    (lambda: tiny_tokenizer_with(normalizers.BertNormalizer()), False),  # drops control characters
    (whitespace_word_tokenizer, False),
])
def test_4_the_cheap_length_bound_applies_only_where_no_character_is_dropped(make_tokenizer, bounded):
    bound = prompt_chars_bound(PreTrainedTokenizerFast(tokenizer_object=make_tokenizer()), 4096)
    assert (bound is not None) == bounded


def test_4_a_prompt_that_fits_is_never_refused_by_its_length(tmp_path):
    folder = checkpoint_with_tokenizer(tmp_path / "model", whitespace_word_tokenizer(), unk_token="[UNK]")
    running = start_server(ServerConfig(model_name=MODEL), model=str(folder))
    try:
        body = {"model": MODEL, "prompt": "hello" + " " * 30_000 + "world", "max_tokens": 2, "ignore_eos": True}
        response = post(running, "/v1/completions", body)  # 30,011 characters, 2 tokens
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == 2
    finally:
        stop_server(running)


def test_5_a_non_streaming_client_that_hangs_up_aborts_its_request(server):
    aborted = server.engine.num_aborted
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=headers(), timeout=1.0)
    assert wait_until_idle(server.engine)
    assert server.engine.num_aborted == aborted + 1 and server.engine.num_streams == 0


def test_6_a_request_that_can_never_fit_is_a_400():
    running = start_server(ServerConfig(model_name=MODEL, max_concurrent_requests=256))
    try:
        response = post(running, "/v1/completions", {"model": MODEL, "prompt": ["x"] * 300, "max_tokens": 1})
        assert_openai_error(response, 400, "prompt", "at most 256 requests at once")
    finally:
        stop_server(running)


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1])
def test_7_seed_out_of_range_names_the_field(server, seed):
    response = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "seed": seed})
    assert_openai_error(response, 400, "seed")


def test_7_seeds_at_the_ends_of_the_range_work(server):
    for seed in (2**63 - 1, -(2**63)):
        assert post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "seed": seed, "n": 2}).status_code == 200


def test_8_every_error_is_in_openai_shape(server):
    assert_openai_error(post(server, "/v1/completions", b'{"model": "\xff\xfe"}'), 400, None, "could not be parsed")
    nested = "[" * 5000 + "]" * 5000
    assert_openai_error(post(server, "/v1/completions", '{"model": %s}' % nested), 400)
    assert_openai_error(httpx.get(f"{server.url}/v1/nowhere", headers=headers()), 404, None, "no route /v1/nowhere")
    assert_openai_error(httpx.get(f"{server.url}/v1/completions", headers=headers()), 405, None, "GET is not allowed")
    core = server.engine.engine
    original = core.make_request
    core.make_request = lambda *args: 1 / 0  # a bug the server did not expect
    try:
        response = post(server, "/v1/completions", {"model": MODEL, "prompt": "x"})
    finally:
        core.make_request = original
    assert_openai_error(response, 500, None, "internal server error (ZeroDivisionError)")
    assert response.json()["error"]["type"] == "internal_server_error"


def test_8_an_engine_error_mid_stream_ends_it_with_an_error_event(server, monkeypatch):
    runner = server.engine.engine.runner
    steps, execute = itertools.count(), runner.execute

    def fails_on_the_fourth_step(*args, **kwargs):
        if next(steps) == 3:
            raise RuntimeError("a kernel failed")
        return execute(*args, **kwargs)

    monkeypatch.setattr(runner, "execute", fails_on_the_fourth_step)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 50, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers(), timeout=30) as stream:
        events = [line for line in stream.iter_lines() if line]
    assert len(events) > 2 and events[-1] == "data: [DONE]"  # chunks, then the error, then [DONE]
    assert "choices" in json.loads(events[0].removeprefix("data: "))
    error = json.loads(events[-2].removeprefix("data: "))
    assert set(error) == {"error"} and error["error"]["code"] == 500
    assert error["error"]["message"] == "internal server error (RuntimeError); the server log has the details"
    assert wait_until_idle(server.engine)


def test_9_a_shard_outside_the_checkpoint_folder_is_refused(tmp_path):
    folder, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    folder.mkdir(), elsewhere.mkdir()
    (elsewhere / "x.safetensors").write_bytes(b"")
    for shard in ("../elsewhere/x.safetensors", str(elsewhere / "x.safetensors"), "sub/../../elsewhere/x.safetensors"):
        index = {"weight_map": {"model.norm.weight": shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="'model.norm.weight' names shard .* not a file name inside"):
            CheckpointReader(folder)


def test_10_the_ready_line_never_prints_the_api_key():
    line = ready_message(ServerConfig(model_name=MODEL, api_key="s3cret"), ListenOptions(port=1234))
    assert "s3cret" not in line and "Bearer $MOESERVE_API_KEY" in line and "http://127.0.0.1:1234" in line
    assert "Authorization" not in ready_message(ServerConfig(model_name=MODEL), ListenOptions())


@pytest.mark.parametrize("body,param", [
    ('{"temperature": Infinity}', "temperature"),
    ('{"temperature": NaN}', "temperature"),
    ('{"repetition_penalty": Infinity}', "repetition_penalty"),
    ('{"repetition_penalty": 1e-40}', "repetition_penalty"),
    ('{"top_p": NaN}', "top_p"),
    ('{"presence_penalty": -Infinity}', "presence_penalty"),
    ('{"logit_bias": {"5": NaN}}', "logit_bias.5"),
    ('{"logit_bias": {"5": Infinity}}', "logit_bias.5"),
])
def test_11_non_finite_and_degenerate_values_are_refused(server, body, param):
    fields = body[1:-1]
    request = '{"model": "%s", "prompt": "x", %s}' % (MODEL, fields)
    assert_openai_error(post(server, "/v1/completions", request), 400, param)


def test_12_stop_strings_are_bounded_and_cheap(server):
    huge = {"model": MODEL, "prompt": "x", "stop": ["ab" * 20_000] * 100}
    assert_openai_error(post(server, "/v1/completions", huge), 413, None, "over")  # 4 MB: over this body limit
    many = {"model": MODEL, "prompt": "x", "stop": ["ab" * 200] * 50}  # within the body limit, over the stop bound
    assert_openai_error(post(server, "/v1/completions", many), 400, "stop", "at most 16384 characters")
    too_many = {"model": MODEL, "prompt": "x", "stop": [f"s{i}" for i in range(65)]}
    assert_openai_error(post(server, "/v1/completions", too_many), 400, "stop", "at most 64")
    allowed = {"model": MODEL, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True,
               "stop": [f"{i:03d}" * 80 for i in range(64)]}  # 64 stops, 15360 characters: within the bounds
    response = post(server, "/v1/completions", allowed)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 200


class CountedReads:
    """A stop string that counts the characters read from it (str methods would go unseen, so it is none)."""

    def __init__(self, text: str):
        self.text, self.reads = text, 0

    def __len__(self):
        return len(self.text)

    def __getitem__(self, index):
        self.reads += 1
        return self.text[index]


@pytest.mark.parametrize("length", [10, 10_000])
def test_12_stop_matching_reads_a_few_characters_per_new_one_whatever_the_stop_length(length):
    text = "ab" * 2000  # extends a partial match of the stop at every character, never completes it
    stop = CountedReads("ab" * (length // 2) + "x")
    matcher = StopMatcher([stop])
    stop.reads = 0  # the automaton's construction reads the stop once
    for start in range(0, len(text), 7):
        assert matcher.feed(text[start : start + 7]) is None
    assert stop.reads <= 3 * len(text)


def test_12_the_bound_holds_offline_too():
    from moeserve.sampling_params import SamplingParams, SamplingParamsError

    with pytest.raises(SamplingParamsError, match="stop may hold at most 16384 characters"):
        SamplingParams(stop=["ab" * 20_000] * 50)
