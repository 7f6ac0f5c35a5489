"""Request latencies come from the arrival and the times the engine produced each output, not from
when a reader happened to get them."""

from types import SimpleNamespace

from moeserve.engine.stats import EngineState
from moeserve.server.metrics import Metrics, RequestTimer


def output(tokens: int, produced: float, finished=False):
    completion = SimpleNamespace(token_ids=list(range(tokens)))
    return SimpleNamespace(outputs=[completion], metrics={"time": produced, "queue_time": 0.25},
                           finished=finished, prompt_token_ids=[1, 2, 3])


def sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(f"moeserve:{name}", {"model_name": "m"})


def test_timer_uses_arrival_and_production_times():
    engine = SimpleNamespace(state=lambda: EngineState(0, 0, 0.0, 0, 0, 0), expert_load=dict,
                             expert_imbalance=dict, finish_reasons={"stop": 0, "length": 0}, num_aborted=0)
    metrics = Metrics(engine, "m")
    timer = RequestTimer(metrics, arrival=100.0)
    for out in (output(0, 100.5), output(1, 101.0), output(3, 101.5), output(4, 103.0, finished=True)):
        timer.on_output(out)  # read long after they were produced: the reader's clock must not matter
    assert sample(metrics, "time_to_first_token_seconds_sum") == 1.0
    assert sample(metrics, "e2e_request_latency_seconds_sum") == 3.0
    assert sample(metrics, "inter_token_latency_seconds_count") == 3  # tokens 2, 3 (one step) and 4
    assert sample(metrics, "inter_token_latency_seconds_sum") == 0.25 + 0.25 + 1.5
    assert sample(metrics, "request_queue_time_seconds_sum") == 0.25
    assert sample(metrics, "generation_tokens_total") == 4 and sample(metrics, "prompt_tokens_total") == 3
