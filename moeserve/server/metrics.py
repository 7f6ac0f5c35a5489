"""Prometheus metrics, named as vLLM names them (prefix moeserve:), plus the tokens each MoE layer
routed to each expert, so operators can see expert imbalance."""

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)


class EngineCollector:
    """Engine state read at scrape time."""

    def __init__(self, engine, model_name: str):
        self.engine = engine  # an AsyncEngine
        self.labels = {"model_name": model_name}

    def collect(self):
        state = self.engine.state()
        yield self.gauge("num_requests_running", "Sequences being generated", state.running)
        yield self.gauge("num_requests_waiting", "Sequences waiting to be scheduled", state.waiting)
        yield self.gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full)", state.kv_cache_usage)
        yield self.counter("num_preemptions", "Sequences preempted (recomputed later)", state.num_preemptions)
        yield self.counter("prefix_cache_queries", "Tokens looked up in the prefix cache", state.prefix_cache_queries)
        yield self.counter("prefix_cache_hits", "Tokens found in the prefix cache", state.prefix_cache_hits)
        success = CounterMetricFamily("moeserve:request_success", "Completions that finished, by finish reason",
                                      labels=["model_name", "finished_reason"])
        for reason in ("stop", "length"):
            success.add_metric([self.labels["model_name"], reason], self.engine.finish_reasons[reason])
        yield success
        yield self.counter("num_aborted_requests", "Requests that ended before finishing (client gone, shutdown)",
                           self.engine.num_aborted)
        experts = CounterMetricFamily("moeserve:expert_tokens", "Tokens routed to each expert, per MoE layer",
                                      labels=["model_name", "layer", "expert"])
        for layer, counts in self.engine.expert_load().items():
            for expert, count in enumerate(counts):
                experts.add_metric([self.labels["model_name"], str(layer), str(expert)], count)
        yield experts
        balance = GaugeMetricFamily("moeserve:expert_rank_imbalance",
                                    "This rank's routed tokens so far as the current expert placement spreads them over the "
                                    "EP ranks: max over mean per MoE layer (1 = even)",
                                    labels=["model_name", "layer"])
        for layer, value in self.engine.expert_imbalance().items():
            balance.add_metric([self.labels["model_name"], str(layer)], value)
        yield balance

    def gauge(self, name, documentation, value):
        family = GaugeMetricFamily(f"moeserve:{name}", documentation, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def counter(self, name, documentation, value):
        family = CounterMetricFamily(f"moeserve:{name}", documentation, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family


class Metrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, model_name))
        labels = ["model_name"]

        def histogram(name, documentation):
            return Histogram(f"moeserve:{name}", documentation, labels, registry=self.registry,
                             buckets=LATENCY_BUCKETS).labels(model_name)

        def counter(name, documentation):
            return Counter(f"moeserve:{name}", documentation, labels, registry=self.registry).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first output token")
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive output tokens")
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last output token")
        self.queue = histogram("request_queue_time_seconds", "Time a request waited before it was first scheduled")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "Generated tokens")

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latencies of one request from its arrival and the times the engine produced its outputs (so a
    reader that falls behind, e.g. one draining several prompts in turn, does not skew them)."""

    def __init__(self, metrics: Metrics, arrival: float):
        self.metrics = metrics
        self.arrival = arrival
        self.last_token_time: float | None = None
        self.tokens = 0

    def on_output(self, output) -> None:
        produced = output.metrics.get("time", time.monotonic())
        tokens = sum(len(c.token_ids) for c in output.outputs)
        new = tokens - self.tokens
        if new > 0:
            if self.last_token_time is None:
                self.metrics.ttft.observe(produced - self.arrival)
                queue_time = output.metrics.get("queue_time")
                if queue_time is not None:
                    self.metrics.queue.observe(queue_time)
            else:
                for _ in range(new):
                    self.metrics.itl.observe((produced - self.last_token_time) / new)
            self.metrics.generation_tokens.inc(new)
            self.last_token_time, self.tokens = produced, tokens
        if output.finished:
            self.metrics.e2e.observe(produced - self.arrival)
            self.metrics.prompt_tokens.inc(len(output.prompt_token_ids))
