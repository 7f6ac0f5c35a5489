"""Expert load from the engine and from /metrics, the per-rank load before and after balancing, and the
pictures: produced, decodable and not blank."""

import http.server
import threading
from types import SimpleNamespace

import pytest
import torch

from moeserve.bench.expert_load import ExpertLoad, fetch_metrics, parse_metrics, rank_loads, report, show
from moeserve.cli import main
from moeserve.engine.stats import EngineState
from moeserve.server.metrics import Metrics

pytest.importorskip("matplotlib")


def skewed_load(layers=4, experts=16, seed=0) -> dict[int, list[int]]:
    """Per layer, one expert gets half of the tokens."""
    g = torch.Generator().manual_seed(seed)
    load = {}
    for layer in range(1, layers + 1):
        counts = torch.randint(50, 150, (experts,), generator=g)
        hot = int(torch.randint(0, experts, (1,), generator=g))
        counts[hot] = counts.sum() - counts[hot]
        load[layer] = counts.tolist()
    return load


def served_metrics(load: dict[int, list[int]]) -> str:
    engine = SimpleNamespace(state=lambda: EngineState(0, 0, 0.0, 0, 0, 0), expert_load=lambda: load,
                             expert_imbalance=lambda: {layer: 1.0 for layer in load},
                             finish_reasons={"stop": 0, "length": 0}, num_aborted=0)
    return Metrics(engine, "m").render().decode()


def assert_picture(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = torch.from_numpy(matplotlib.image.imread(str(path)))
    assert pixels.shape[0] > 300 and pixels.shape[1] > 300
    assert pixels[..., :3].std() > 0.05  # drawn, not blank


def test_metrics_text_gives_back_the_engines_counts():
    load = skewed_load()
    parsed = parse_metrics(served_metrics(load))
    assert parsed.layers == sorted(load)
    assert parsed.counts.tolist() == [load[layer] for layer in sorted(load)]


def test_metrics_without_expert_counts_are_refused():
    with pytest.raises(ValueError, match="no moeserve:expert_tokens_total samples"):
        parse_metrics(served_metrics({}))
    with pytest.raises(ValueError, match="same experts"):
        parse_metrics(served_metrics({1: [1, 2, 3], 2: [1, 2]}))


def test_balancing_the_skewed_trace_brings_max_over_mean_under_1_15():
    load = parse_metrics(served_metrics(skewed_load(layers=3, experts=16)))
    loads = rank_loads(load, ranks=4, redundant=4)
    before, after = loads.imbalance()
    assert (before > 1.5).all()  # the hot expert's rank computes over half of the tokens
    assert (after <= 1.15).all()
    assert torch.allclose(loads.before.sum(-1), load.counts.sum(-1))  # every token placed
    assert torch.allclose(loads.after.sum(-1), load.counts.sum(-1))
    text = report(load, loads)
    assert f"{float(before.max()):.3f}" in text and f"{float(after.max()):.3f}" in text


def test_uneven_layouts_are_refused_with_the_numbers():
    load = ExpertLoad([1], torch.ones(1, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="16 experts cannot be split evenly over 3"):
        rank_loads(load, ranks=3)
    with pytest.raises(ValueError, match="16 experts \\+ 3 redundant"):
        rank_loads(load, ranks=4, redundant=3)


def test_picture_is_drawn(tmp_path):
    load = parse_metrics(served_metrics(skewed_load()))
    show(load, 4, 4, str(tmp_path / "load.png"), title="skewed")
    assert_picture(tmp_path / "load.png")


@pytest.fixture
def metrics_server():
    text = served_metrics(skewed_load(layers=2, experts=8)).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            found = self.path == "/metrics"
            self.send_response(200 if found else 404)
            self.end_headers()
            self.wfile.write(text if found else b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_stats_reads_a_servers_metrics_and_draws(metrics_server, tmp_path, capsys):
    picture = tmp_path / "stats.png"
    assert main(["stats", "--url", metrics_server, "--plot", str(picture), "--ranks", "2",
                 "--num-redundant-experts", "2"]) == 0
    out = capsys.readouterr().out
    assert "over 2 ranks" in out and "worst" in out
    assert "the server's own placement (its EP ranks' tokens): worst layer 1 at 1.000" in out
    assert_picture(picture)


def test_stats_says_when_there_is_no_server(capsys):
    with pytest.raises(ValueError, match="is `moeserve serve` running there"):
        fetch_metrics("http://127.0.0.1:9", timeout=2)
    assert main(["stats", "--url", "http://127.0.0.1:9"]) == 2
    assert "could not read http://127.0.0.1:9/metrics" in capsys.readouterr().err


def test_bench_throughput_draws_the_runs_expert_load(tmp_path, capsys):
    picture = tmp_path / "throughput.png"
    assert main(["bench", "throughput", "--model", "tiny-deepseek-v3", "--num-prompts", "4", "--input-len", "8",
                 "--output-len", "4", "--expert-load", str(picture), "--expert-load-ranks", "4"]) == 0
    out = capsys.readouterr().out
    assert "over 4 ranks" in out
    assert_picture(picture)
