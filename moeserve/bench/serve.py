"""A load generator for any OpenAI-compatible server (moeserve's or vLLM's), reporting what
`vllm bench serve` reports: TTFT = send to the first streamed chunk; ITL = gaps between streamed chunks;
TPOT per request = (e2e - TTFT) / (output tokens - 1). Prompts are random token ids of an exact
length (sent as a token array), outputs have an exact length with ignore_eos."""

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class ServeReport:
    successful_requests: int
    failed_requests: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: dict
    tpot_ms: dict
    itl_ms: dict

    def text(self) -> str:
        lines = [f"{'successful requests':<32}{self.successful_requests}", f"{'failed requests':<32}{self.failed_requests}",
                 f"{'benchmark duration (s)':<32}{self.duration_s:.2f}",
                 f"{'total input tokens':<32}{self.total_input_tokens}", f"{'total generated tokens':<32}{self.total_output_tokens}",
                 f"{'request throughput (req/s)':<32}{self.request_throughput:.2f}",
                 f"{'output token throughput (tok/s)':<32}{self.output_throughput:.2f}",
                 f"{'total token throughput (tok/s)':<32}{self.total_token_throughput:.2f}"]
        for name, stats in (("TTFT", self.ttft_ms), ("TPOT", self.tpot_ms), ("ITL", self.itl_ms)):
            lines += [f"{f'{kind} {name} (ms)':<32}{stats[kind]:.2f}" for kind in ("mean", "median", "p99")]
        return "\n".join(lines)


def summary_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mean": 1000 * statistics.mean(values), "median": 1000 * statistics.median(values), "p99": 1000 * p99}


async def one_request(http: httpx.AsyncClient, url: str, body: dict, headers: dict) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(ok=False, prompt_tokens=len(body["prompt"]))
    last = None
    try:
        async with http.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):  # one chunk per step with new tokens (text may be held back or absent)
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
        result.e2e = time.perf_counter() - start
        result.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = repr(error)
    return result


async def run_benchmark(base_url: str, model: str, num_prompts: int, input_len: int, output_len: int,
                        request_rate: float, max_concurrency: int | None, seed: int, ignore_eos: bool,
                        api_key: str | None, vocab_size: int) -> tuple[ServeReport, list[RequestResult]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]
    gaps = [0.0 if request_rate == float("inf") else rng.expovariate(request_rate) for _ in prompts]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(max_concurrency or num_prompts)
    url = base_url.rstrip("/") + "/v1/completions"

    async def send(http, prompt):
        body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
        async with limit:
            return await one_request(http, url, body, headers)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=None)) as http:
        start = time.perf_counter()
        tasks = []
        for prompt, gap in zip(prompts, gaps):
            await asyncio.sleep(gap)  # Poisson arrivals; inf: all at once
            tasks.append(asyncio.create_task(send(http, prompt)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return report_of(results, duration), results


def report_of(results: list[RequestResult], duration: float) -> ServeReport:
    done = [r for r in results if r.ok]
    inputs, outputs = sum(r.prompt_tokens for r in done), sum(r.output_tokens for r in done)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return ServeReport(
        successful_requests=len(done), failed_requests=len(results) - len(done), duration_s=duration,
        total_input_tokens=inputs, total_output_tokens=outputs, request_throughput=len(done) / duration,
        output_throughput=outputs / duration, total_token_throughput=(inputs + outputs) / duration,
        ttft_ms=summary_ms([r.ttft for r in done]), tpot_ms=summary_ms(tpots),
        itl_ms=summary_ms([gap for r in done for gap in r.itls]),
    )


def save(report: ServeReport, path: str, settings: dict) -> None:
    with open(path, "w") as f:
        json.dump({"settings": settings, "report": asdict(report)}, f, indent=2)


def plot(results: list[RequestResult], path: str) -> None:
    from moeserve.bench.expert_load import pyplot

    plt = pyplot()
    done = [r for r in results if r.ok]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for axis, values, title in ((left, [1000 * r.ttft for r in done], "time to first token (ms)"),
                                (right, [1000 * g for r in done for g in r.itls], "inter-token latency (ms)")):
        axis.hist(values, bins=40)
        axis.set_title(title)
        axis.set_ylabel("count")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
