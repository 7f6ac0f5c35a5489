"""The HTTP server, started for real on a loopback port, driven by the official openai client, httpx,
and a schema fuzzer."""

import asyncio
import json
import re
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest

from moeserve.server.app import ServerConfig
from tests.distributed.harness import free_port
from tests.server.harness import KEY, MODEL, headers, start_server, stop_server, wait_until_idle


def test_openai_client_completion_stream_and_usage(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    full = client.completions.create(**kwargs)
    assert full.choices[0].finish_reason in ("stop", "length") and full.usage.completion_tokens >= 1
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_openai_client_chat_stream_and_usage(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_completion_tokens=10, temperature=0)
    full = client.chat.completions.create(**kwargs)
    assert full.choices[0].message.role == "assistant" and full.usage.prompt_tokens > 3
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_logprobs_n_and_extras(client):
    completion = client.completions.create(model=MODEL, prompt="Hi", max_tokens=5, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) and all(lp <= 0 for lp in logprobs.token_logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert content and all(len(entry.top_logprobs) == 3 for entry in content)
    alone = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           temperature=0, logprobs=True)  # no top_logprobs: the sampled tokens'
    content = alone.choices[0].logprobs.content
    assert len(content) == 4 and all(entry.logprob <= 0 and entry.top_logprobs == [] for entry in content)
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                              temperature=0, logprobs=True, stream=True)
    assert [e.logprob for c in streamed for e in c.choices[0].logprobs.content] == [e.logprob for e in content]
    many = client.completions.create(model=MODEL, prompt="Hi", max_tokens=6, n=3, temperature=1.0, seed=7,
                                     extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1,
                                                 "ignore_eos": True, "min_tokens": 6})
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in many.choices)


def test_seed_reproduces(client):
    def run(seed):
        return client.completions.create(model=MODEL, prompt="The", max_tokens=12, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text

    assert run(3) == run(3)
    assert len({run(3), run(4), run(5)}) > 1


@pytest.mark.parametrize("body,message,param", [
    ("{not json", "not valid JSON", None),
    ({"model": "other", "prompt": "x"}, "the model 'other' does not exist", "model"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, "max_tokens: Input should be a valid integer", "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, "temperature: Input should be greater than or equal to 0",
     "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, "top_p: Input should be less than or equal to 1", "top_p"),
    ({"model": MODEL, "prompt": "x", "n": 100}, "n must be between 1 and 16", "n"),
    ({"model": MODEL, "prompt": [5] * 5000}, "the prompt has 5000 tokens; max_model_len is 4096", "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 9000}, "exceeds max_model_len=4096", "max_tokens"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"99999": 1}}, "token id 99999 is outside the vocabulary", "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias.abc.[key]: Input should be a valid integer",
     "logit_bias.abc.[key]"),
    ({"model": MODEL, "prompt": [], "max_tokens": 3}, "prompt: must be a non-empty string, a non-empty list of them", "prompt"),
    ({"model": MODEL}, "prompt: Field required", "prompt"),
    ("", "the request body is empty: send a JSON object", None),
    ("[1]", "the request body must be a JSON object", None),
])
def test_bad_completion_input_gets_400_naming_the_problem(server, body, message, param):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{server.url}/v1/completions", content=content,
                          headers={**headers(), "Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_bad_chat_input(server):
    def post(body):
        return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers())

    response = post({"model": MODEL, "messages": []})
    assert response.status_code == 400 and "messages" in response.json()["error"]["message"]
    response = post({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]})
    assert response.status_code == 400 and "messages.0.role" in response.json()["error"]["message"]
    response = post({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"


def test_auth_size_limit_and_open_health(server):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 401
    wrong = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/v1/models", headers=headers()).json()["data"][0]["id"] == MODEL
    assert httpx.get(f"{server.url}/health").status_code == 200
    huge = httpx.post(f"{server.url}/v1/completions", content="x" * (2**20 + 10),
                      headers={**headers(), "Content-Type": "application/json"})
    assert huge.status_code == 413
    chunked = httpx.post(f"{server.url}/v1/completions", content=iter([b"x" * 2**19] * 3),  # no Content-Length
                         headers={**headers(), "Content-Type": "application/json"})
    assert chunked.status_code == 413 and "over" in chunked.json()["error"]["message"]


def test_concurrent_streams_give_the_greedy_text_they_get_alone(server):
    prompts = [f"Story number {i}:" for i in range(8)]

    async def one(http, prompt):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": True,
                "ignore_eos": True}
        text = ""
        async with http.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers()) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def run(all_prompts):
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(one(http, p) for p in all_prompts))

    alone = asyncio.run(run(prompts))  # eight at a time first, to know each prompt's text
    together = asyncio.run(run([prompts[i % 8] for i in range(64)]))
    assert together == [alone[i % 8] for i in range(64)]
    assert wait_until_idle(server.engine)


def test_a_completion_that_finishes_first_says_so_once(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "n": 4, "temperature": 1.0, "seed": 3,
            "stop": [" "], "stream": True}  # the four stop at different steps
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers()) as stream:
        choices = [c for line in stream.iter_lines() if line.startswith("data: {")
                   for c in json.loads(line[6:])["choices"]]
    for index in range(4):  # its finish_reason in its last chunk, and in no other
        finished = [c["finish_reason"] is not None for c in choices if c["index"] == index]
        assert finished == [False] * (len(finished) - 1) + [True]


def streamed_texts(server, body) -> list[str]:
    """The text of each chunk of a stream of one completion (a chunk per generated token)."""
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, headers=headers()) as stream:
        return [json.loads(line[6:])["choices"][0]["text"] for line in stream.iter_lines()
                if line.startswith("data: {")]


def test_streamed_text_is_the_final_text_when_a_stop_string_begins_before_min_tokens(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    pieces = streamed_texts(server, body)
    text = "".join(pieces)
    k = next(k for k in range(2, len(pieces) - 1) if pieces[k].strip() and pieces[k + 1].strip()
             and text.find(pieces[k] + pieces[k + 1]) == len("".join(pieces[:k])))
    # the stop begins in generated token k, below min_tokens, and completes in token k + 1, which reaches it
    stopped = {**body, "stop": [pieces[k] + pieces[k + 1]], "min_tokens": k + 2}
    final = httpx.post(f"{server.url}/v1/completions", json=stopped, headers=headers()).json()["choices"][0]
    assert final["finish_reason"] == "stop" and final["text"] == "".join(pieces[:k])
    assert "".join(streamed_texts(server, stopped)) == final["text"]


def test_client_that_disconnects_mid_stream_frees_its_request(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers(), timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    assert wait_until_idle(server.engine)


def test_metrics_move_as_requests_are_served(server, client):
    def scrape():
        lines = httpx.get(f"{server.url}/metrics").text.splitlines()
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in lines if line.startswith("moeserve:")}

    before = scrape()
    client.completions.create(model=MODEL, prompt="Count", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    after = scrape()
    label = f'{{model_name="{MODEL}"}}'
    assert after[f"moeserve:generation_tokens_total{label}"] - before[f"moeserve:generation_tokens_total{label}"] == 5
    assert after[f"moeserve:time_to_first_token_seconds_count{label}"] > before[f"moeserve:time_to_first_token_seconds_count{label}"]
    assert after[f"moeserve:prefix_cache_queries_total{label}"] > before[f"moeserve:prefix_cache_queries_total{label}"]
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
                 "prompt_tokens_total", "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
                 "request_queue_time_seconds_count", "prefix_cache_hits_total"):
        assert f"moeserve:{name}{label}" in after, name
    routed = [v for k, v in after.items() if k.startswith("moeserve:expert_tokens_total")]
    assert len(routed) == 3 * 8 and sum(routed) > 0  # 3 MoE layers x 8 experts


def test_too_many_concurrent_requests_get_429():
    running = start_server(ServerConfig(model_name=MODEL, max_concurrent_requests=1))
    try:
        slow = {"model": MODEL, "prompt": "x", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=slow, timeout=30) as first:
            lines = first.iter_lines()  # held: a discarded iterator closes the stream (a disconnect)
            next(lines)
            second = httpx.post(f"{running.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
            assert second.status_code == 429 and second.json()["error"]["type"] == "rate_limit_error"
    finally:
        stop_server(running)


def test_a_burst_cannot_pass_the_concurrency_limit():
    running = start_server(ServerConfig(model_name=MODEL, max_concurrent_requests=4))
    peak = 0

    async def burst():
        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, running.engine.num_streams)
                await asyncio.sleep(0.002)

        watcher = asyncio.ensure_future(watch())
        body = {"model": MODEL, "prompt": "Hello " * 300, "max_tokens": 100, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=120) as http:
            responses = await asyncio.gather(*(http.post(f"{running.url}/v1/completions", json=body) for _ in range(20)))
        watcher.cancel()
        return sorted(r.status_code for r in responses)

    try:
        statuses = asyncio.run(burst())  # all sent at once: none runs before the last is admitted or refused
        assert statuses == [200] * 4 + [429] * 16 and peak <= 4
    finally:
        stop_server(running)


def test_schema_fuzzing_finds_no_server_errors(tmp_path):
    """Cases generated from the published schema, and no answer is a 5xx; the cases the schema calls
    valid mostly are (it carries the server's limits), so the fuzz reaches past the request checks."""
    running = start_server(ServerConfig(model_name=MODEL, api_key=KEY), max_model_len=96)  # short: fast generations
    try:
        command = [sys.executable, "-m", "schemathesis.cli", "run", f"{running.url}/openapi.json", "--checks",
                   "not_a_server_error", "--max-examples", "100", "-H", f"Authorization: Bearer {KEY}",
                   "--request-timeout", "30", "--generation-deterministic", "--suppress-health-check", "all",
                   "--report", "ndjson", "--report-ndjson-path", str(tmp_path / "events.ndjson")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        generated = int(re.search(r"(\d+) generated", result.stdout).group(1))
        assert generated > 1000 and "No issues found" in result.stdout, result.stdout[-4000:]
    finally:
        stop_server(running)
    valid = answers_to_valid_cases(tmp_path / "events.ndjson")
    for operation in ("POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize"):
        assert valid[operation, 2] > 4 * valid[operation, 4], (operation, valid)


def answers_to_valid_cases(events_path) -> Counter:
    """(operation, status // 100) -> how many cases generated as valid ("positive") got that answer."""
    answers = Counter()
    for line in events_path.read_text().splitlines():
        scenario = json.loads(line).get("ScenarioFinished", {}).get("recorder", {})
        for case_id, case in scenario.get("cases", {}).items():
            interaction = scenario["interactions"].get(case_id)
            if interaction and case["value"]["meta"]["generation"]["mode"] == "positive":
                answers[scenario["label"], interaction["response"]["status_code"] // 100] += 1
    return answers


def test_bench_serve_reports_like_vllm(server, tmp_path, capsys):
    from moeserve.cli import main

    result_file = tmp_path / "result.json"
    args = ["bench", "serve", "--base-url", server.url, "--model", MODEL, "--num-prompts", "12", "--input-len", "16",
            "--output-len", "6", "--request-rate", "50", "--max-concurrency", "4", "--ignore-eos", "--api-key", KEY,
            "--save-result", str(result_file), "--expert-load", str(tmp_path / "load.png"), "--expert-load-ranks", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "load.png").stat().st_size > 10_000 and "over 2 ranks" in printed
    for label in ("successful requests", "output token throughput", "Mean TTFT", "P99 ITL", "Median TPOT"):
        assert label.lower() in printed.lower()
    report = json.loads(result_file.read_text())["report"]
    assert report["successful_requests"] == 12 and report["total_output_tokens"] == 12 * 6
    assert report["total_input_tokens"] == 12 * 16 and report["ttft_ms"]["median"] > 0


def test_two_rank_server_answers_like_one_process_and_shuts_down_cleanly():
    import os
    import signal

    port = free_port()
    command = [sys.executable, "-m", "moeserve", "serve", "tiny-deepseek-v3", "--port", str(port), "--device", "cpu",
               "--dp", "2", "--ep", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        bodies = [{"model": "tiny-deepseek-v3", "prompt": prompt, "max_tokens": 8, "temperature": 0}
                  for prompt in ("Hello", "The router scores", "Once upon")]
        served = [httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=b, timeout=60).json() for b in bodies]
        from moeserve.llm import LLM
        from moeserve.sampling_params import SamplingParams

        alone = LLM("tiny-deepseek-v3").generate([b["prompt"] for b in bodies], SamplingParams(temperature=0, max_tokens=8))
        assert [s["choices"][0]["text"] for s in served] == [o.outputs[0].text for o in alone]
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-3000:]
    assert "curl http://127.0.0.1" in stdout
