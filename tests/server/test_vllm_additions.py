"""What a vLLM user reaches for on day one: vLLM's endpoints and fields, its flags, its log lines."""

import asyncio
import logging
import ssl
import subprocess
import threading

import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer, processors

from moeserve.cli import byte_size, main
from moeserve.engine.args import EngineArgs
from moeserve.engine.async_engine import AsyncEngine
from moeserve.engine.kv_cache import bytes_per_block
from moeserve.llm import LLM
from moeserve.loader.model_loader import load_config
from moeserve.loader.presets import materialize
from moeserve.sampling_params import SamplingParams
from moeserve.server.app import ServerConfig
from moeserve.server.serve import ListenOptions
from moeserve.version import __version__
from tests.server.harness import (KEY, MODEL, checkpoint_with_tokenizer, headers, start_server, stop_server,
                                  wait_until_idle)


def test_tokenize_and_detokenize_round_trip(server):
    core = server.engine.engine
    tokens = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": "Hello world", "return_token_strs": True},
                        headers=headers()).json()
    assert tokens["tokens"] == core.tokenizer.encode("Hello world") and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == 4096
    assert tokens["token_strs"] == core.tokenizer.convert_ids_to_tokens(tokens["tokens"])  # "Ġworld", as vLLM's
    plain = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello"}, headers=headers()).json()
    assert plain["token_strs"] is None  # present, null unless asked
    text = httpx.post(f"{server.url}/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}, headers=headers())
    assert text.json() == {"prompt": "Hello world"}
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]},
                      headers=headers()).json()
    rendered = core.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                  add_generation_prompt=True)
    assert chat["tokens"] == core.tokenizer.encode(rendered, add_special_tokens=False)
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "x"}).status_code == 401  # the key guards it
    both = httpx.post(f"{server.url}/tokenize", json={"prompt": "x", "messages": [{"role": "user", "content": "x"}]},
                      headers=headers())
    assert both.status_code == 400 and both.json()["error"]["param"] == "prompt"
    outside = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**6]}, headers=headers())
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "tokens"


def bos_tokenizer():
    """The tiny tokenizer, adding <s> before every text it encodes with special tokens."""
    tokenizer = Tokenizer.from_file(str(materialize(MODEL) / "tokenizer.json"))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tokenizer


def test_chat_templates_write_their_special_tokens_and_the_tokenizer_adds_none(tmp_path):
    folder = checkpoint_with_tokenizer(tmp_path / "model", bos_tokenizer(), bos_token="<s>", eos_token="</s>")
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    running = start_server(ServerConfig(model_name=MODEL, chat_template=template), model=str(folder))
    try:
        def tokenize(body):
            return httpx.post(f"{running.url}/tokenize", json=body).json()["tokens"]

        messages = [{"role": "user", "content": "Hello"}]
        from_chat = tokenize({"messages": messages})
        assert from_chat[0] == 0 and from_chat[1] != 0  # the template's <s>, and no second one
        assert tokenize({"messages": messages, "add_special_tokens": True})[:2] == [0, 0]
        assert tokenize({"prompt": "Hello"})[0] == 0  # a prompt gets the tokenizer's <s>
        chat = httpx.post(f"{running.url}/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                                      "max_tokens": 1})
        assert chat.json()["usage"]["prompt_tokens"] == len(from_chat)
    finally:
        stop_server(running)


def test_a_long_detokenize_never_blocks_the_loop(server, monkeypatch):
    core = server.engine.engine
    entered, release = threading.Event(), threading.Event()
    for tokenizer in (core.tokenizer, core.encoder):
        decode = tokenizer.decode

        def slow_decode(token_ids, *args, decode=decode, **kwargs):  # as slow as the test wants, for long inputs
            if len(token_ids) > 1000:
                entered.set()
                release.wait(60)
            return decode(token_ids, *args, **kwargs)

        monkeypatch.setattr(tokenizer, "decode", slow_decode)
    result = {}
    body = {"tokens": [5] * 2000}
    sender = threading.Thread(target=lambda: result.setdefault("r", httpx.post(f"{server.url}/detokenize", json=body,
                                                                               headers=headers(), timeout=60)))
    sender.start()
    try:
        assert entered.wait(30)
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200  # answered while it decodes
    finally:
        release.set()
        sender.join(60)
    assert result["r"].status_code == 200


def test_version_and_model_cards(server, client):
    assert httpx.get(f"{server.url}/version").json() == {"version": __version__}  # open, like /health
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.owned_by == "moeserve" and card.created > 0
    listed = httpx.get(f"{server.url}/v1/models", headers=headers()).json()["data"][0]
    assert listed["root"] == MODEL and listed["max_model_len"] == 4096 and listed["created"] == card.created
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")


def test_echo_puts_the_prompt_and_its_logprobs_first(server, client):
    plain = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4, temperature=0, logprobs=2)
    echoed = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4, temperature=0, logprobs=2,
                                       echo=True)
    prompt_ids = server.engine.engine.tokenizer.encode("Once upon")
    assert echoed.choices[0].text == "Once upon" + plain.choices[0].text
    logprobs = echoed.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # the first token has none
    assert len(logprobs.tokens) == len(prompt_ids) + 4
    assert logprobs.token_logprobs[len(prompt_ids):] == plain.choices[0].logprobs.token_logprobs
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    stream = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    assert "".join(chunk.choices[0].text for chunk in stream) == echoed.choices[0].text
    # text_offset counts every character sent before, the echoed prompt's too
    assert [o for chunk in stream for o in chunk.choices[0].logprobs.text_offset] == logprobs.text_offset


def test_prompt_logprobs_as_vllm_returns_them(server):
    body = {"model": MODEL, "prompt": "Hello there friend", "max_tokens": 2, "temperature": 0, "prompt_logprobs": 1}
    choice = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers()).json()["choices"][0]
    prompt_ids = server.engine.engine.tokenizer.encode("Hello there friend")
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(prompt_ids) and entries[0] is None
    for token, entry in zip(prompt_ids[1:], entries[1:]):
        assert str(token) in entry and all(set(v) == {"logprob", "rank", "decoded_token"} for v in entry.values())
        assert len(entry) <= 2 and entry[str(token)]["logprob"] <= 0  # the prompt's token and the top one
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "prompt_logprobs": 0}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=chat, headers=headers()).json()
    assert response["prompt_logprobs"][0] is None and len(response["prompt_logprobs"]) == response["usage"]["prompt_tokens"]


def test_request_counters_by_finish_reason_and_aborts(server, client):
    def scrape():
        lines = httpx.get(f"{server.url}/metrics").text.splitlines()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("moeserve:")}

    before = scrape()
    client.completions.create(model=MODEL, prompt="x", max_tokens=3, n=2, extra_body={"ignore_eos": True})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3000, "n": 2,
                                                         "ignore_eos": True}, headers=headers(), timeout=0.5)
    refused = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": [[5], [5] * 5000]},
                         headers=headers())  # the first prompt queued, then withdrawn beside the refused one
    assert refused.status_code == 400
    assert wait_until_idle(server.engine)
    after = scrape()
    length = f'moeserve:request_success_total{{finished_reason="length",model_name="{MODEL}"}}'
    aborted = f'moeserve:num_aborted_requests_total{{model_name="{MODEL}"}}'
    assert after[length] - before[length] == 2  # one per completion
    assert after[aborted] - before[aborted] == 2  # both completions of the request whose client left


def test_cors_is_off_unless_origins_are_allowed(server):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(f"{server.url}/v1/completions", headers=preflight).headers
    running = start_server(ServerConfig(model_name=MODEL, allowed_origins=["https://app.example"]))
    try:
        allowed = httpx.options(f"{running.url}/v1/completions", headers=preflight)
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(f"{running.url}/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        running.engine.engine.make_request = lambda *args: 1 / 0  # a bug: its 500 must still reach the page
        failed = httpx.post(f"{running.url}/v1/completions", json={"model": MODEL, "prompt": "x"},
                            headers={"Origin": "https://app.example"})
        assert failed.status_code == 500 and failed.headers["access-control-allow-origin"] == "https://app.example"
        assert failed.json()["error"]["type"] == "internal_server_error"
    finally:
        stop_server(running)


def test_https_with_a_key_and_certificate(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    listen = ListenOptions(ssl_keyfile=str(key), ssl_certfile=str(cert), uvicorn_log_level="warning")
    running = start_server(ServerConfig(model_name=MODEL), listen=listen)  # through serve's uvicorn_config
    try:
        assert running.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(f"{running.url}/health", verify=context).status_code == 200
    finally:
        stop_server(running)


@pytest.fixture
def parsed_serve(monkeypatch):
    """The arguments `moeserve serve ...` would start the server with (nothing is started)."""
    seen = {}
    monkeypatch.setattr("moeserve.cli.on_ranks", lambda args, fn: seen.setdefault("args", args) and 0)
    return lambda argv: (main(["serve", *argv]), seen.pop("args", None))


def test_serve_takes_vllm_spellings(parsed_serve):
    code, args = parsed_serve(["--model", MODEL, "--tensor-parallel-size", "2", "--data-parallel-size", "3",
                               "--kv-cache-memory", "512MiB", "--allowed-origins", '["https://a.example"]',
                               "--log-level", "warning", "--uvicorn-log-level", "error"])
    assert code == 0 and args.model == MODEL and (args.tp, args.dp) == (2, 3)
    assert args.kv_cache_memory == 512 * 2**20 and args.allowed_origins == ["https://a.example"]
    assert (args.log_level, args.uvicorn_log_level) == ("warning", "error")
    assert parsed_serve([MODEL])[1].model == MODEL  # the positional form still works
    assert parsed_serve([MODEL, "--model", "other"])[0] == 2  # two different models: an error
    assert parsed_serve(["--ssl-keyfile", "k.pem", MODEL])[0] == 2  # a key without its certificate


def test_version_flag_and_help_with_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"moeserve {__version__}"
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 8000)" in text and "(default: 128)" in text and "(default: 127.0.0.1)" in text


@pytest.mark.parametrize("text,expected", [("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
                                           ("1e9", 10**9), ("2048", 2048), ("64 kib", 65536), ("4Gi", 4 * 2**30),
                                           ("4G", 4 * 2**30), ("512M", 512 * 2**20), ("4g", 4 * 10**9),
                                           ("512m", 512 * 10**6), ("1.5k", 1500), (".5KiB", 512)])
def test_byte_sizes(text, expected):  # single letters as vLLM's human-readable ints: lower case 1000, upper 1024
    assert byte_size(text) == expected


@pytest.mark.parametrize("text,message", [("lots", "'lots' is not a size"), ("...", "'...' is not a size"),
                                          ("1e999", "'1e999' is too large"), ("4 GX", "'4 GX' is not a size")])
def test_a_bad_byte_size_is_an_error_that_says_how(capsys, text, message):
    with pytest.raises(SystemExit):
        main(["generate", "--model", MODEL, "--prompt", "x", "--kv-cache-memory", text])
    assert message in capsys.readouterr().err


def test_llm_takes_a_torch_dtype():
    llm = LLM(MODEL, dtype=torch.bfloat16)
    assert llm.engine.dtype == torch.bfloat16
    assert llm.generate("Hi", SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_stats_line_while_serving(caplog):
    engine = AsyncEngine.from_args(EngineArgs(model=MODEL), stats_interval_s=1e-3)
    try:
        with caplog.at_level(logging.INFO, logger="moeserve.stats"):
            async def run():
                return [o async for o in engine.generate("Hello", SamplingParams(max_tokens=5, ignore_eos=True), "s")]

            asyncio.run(run())
    finally:
        engine.shutdown()
    lines = [r.getMessage() for r in caplog.records if r.name == "moeserve.stats"]
    assert any("generation throughput" in line and "KV cache usage" in line and "prefix cache hit rate" in line
               for line in lines), lines


def test_one_warning_per_burst_of_preemptions(caplog):
    block_size, num_blocks = 4, 12  # too few blocks for four long prompts at once: they preempt each other
    kv_bytes = bytes_per_block(load_config("tiny-qwen2-moe"), block_size, torch.float32) * num_blocks
    llm = LLM("tiny-qwen2-moe", max_num_batched_tokens=5, block_size=block_size, kv_cache_memory=kv_bytes,
              max_model_len=44)
    llm.engine.preemption_log.interval_s = 3600  # the whole run is one burst, however slow the machine
    with caplog.at_level(logging.WARNING, logger="moeserve.stats"):
        llm.generate([{"prompt_token_ids": list(range(5, 5 + n))} for n in (12, 14, 16, 18)],
                     SamplingParams(max_tokens=20, ignore_eos=True, temperature=0))
    warnings = [r.getMessage() for r in caplog.records if "preempted" in r.getMessage()]
    assert llm.engine.scheduler.num_preemptions > 1 and len(warnings) == 1  # one burst, one line
    assert "the KV cache ran out of blocks" in warnings[0]


def test_bench_serve_logs_no_line_per_request(server, caplog, capsys):
    logging.getLogger("httpx").setLevel(logging.NOTSET)
    with caplog.at_level(logging.INFO):
        assert main(["bench", "serve", "--base-url", server.url, "--model", MODEL, "--num-prompts", "6", "--input-len",
                     "8", "--output-len", "3", "--ignore-eos", "--api-key", KEY]) == 0
    assert "successful requests" in capsys.readouterr().out
    assert not [r for r in caplog.records if "HTTP Request" in r.getMessage()]


def test_long_prompts_do_not_trip_the_tokenizers_length_warning(capfd):
    llm = LLM(MODEL, max_model_len=4096)
    capfd.readouterr()
    llm.engine.encode("hello " * 5000)  # more tokens than the tokenizer's model_max_length (4096)
    out, err = capfd.readouterr()
    assert "Token indices sequence length" not in out + err
