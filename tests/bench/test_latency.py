import json

import pytest

from moeserve.bench import throughput
from moeserve.bench.latency import IterationTimes, latency_params, percentile, summary, time_iteration
from moeserve.bench.throughput import random_prompts
from moeserve.cli import main
from moeserve.llm import LLM

SMALL = ["--batch-size", "2", "--input-len", "8", "--output-len", "6", "--num-iters", "2", "--num-iters-warmup", "1"]


def test_percentiles_interpolate_between_ranks():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [percentile(values, q) for q in (0, 50, 90, 100)] == [1.0, 3.0, pytest.approx(4.6), 5.0]
    assert percentile([7.0], 99) == 7.0
    assert summary([1.0, 3.0], scale=1000) == {"mean": 2000.0, "p50": 2000.0, "p90": pytest.approx(2800.0),
                                               "p99": pytest.approx(2980.0)}
    assert summary([]) is None


def test_prefill_is_the_first_steps_and_the_first_decode_step_is_left_out():
    times = IterationTimes([0.5, 0.25, 0.125, 0.01, 0.02], prefill_steps=2, e2e_seconds=1.0)
    assert times.prefill_seconds == 0.75
    assert times.decode_step_seconds == [0.01, 0.02]


def test_an_iteration_times_every_step_of_the_batch():
    llm = LLM("tiny-mixtral")
    prompts = random_prompts(llm.engine.config.vocab_size, 3, 8, seed=0)
    times = time_iteration(llm.engine, prompts, latency_params(output_len=5, temperature=1.0))
    assert times.prefill_steps == 1  # 24 prompt tokens fit one step's budget
    assert len(times.step_seconds) == 5  # the prefill gives the first token, then one step per token
    assert len(times.decode_step_seconds) == 3
    assert times.e2e_seconds >= sum(times.step_seconds)
    assert not llm.engine.has_unfinished_requests()


def test_a_long_batch_prefills_in_chunks():
    llm = LLM("tiny-mixtral", max_num_batched_tokens=16)
    prompts = random_prompts(llm.engine.config.vocab_size, 2, 24, seed=0)
    times = time_iteration(llm.engine, prompts, latency_params(output_len=4, temperature=0.0))
    assert times.prefill_steps >= 3  # 48 prompt tokens, at most 16 a step
    assert len(times.step_seconds) == times.prefill_steps + 3  # the last to start needs 3 more tokens


def test_bench_latency_prints_a_table_and_writes_json(capsys, tmp_path):
    path = tmp_path / "latency.json"
    assert main(["bench", "latency", "--model", "tiny-mixtral", *SMALL, "--output-json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| engine | prefill ms (p50) | decode step ms p50 / p90 / p99 | decode tok/s | e2e s (p50) |" in printed
    assert "| moeserve |" in printed
    report = json.loads(path.read_text())
    assert report["settings"]["batch_size"] == 2 and report["device"] == "cpu" and report["profile"] is None
    (result,) = report["results"]
    assert set(result["decode_step_ms"]) == {"mean", "p50", "p90", "p99"}
    assert result["prefill_ms"]["p50"] > 0 and result["e2e_s"]["p50"] > 0
    assert result["decode_tok_per_s"] == pytest.approx(2000 / result["decode_step_ms"]["p50"])


def test_bench_latency_profiles_cpu_operators_without_cuda(capsys, tmp_path):
    path = tmp_path / "latency.json"
    args = ["bench", "latency", "--model", "tiny-qwen3-moe", *SMALL, "--output-len", "8", "--profile",
            "--profile-steps", "3", "--output-json", str(path)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "profile of 3 steady decode steps at batch 2" in printed and "CPU operators (no CUDA)" in printed
    assert "prefill steps of 2 x 8 tokens" in printed
    report = json.loads(path.read_text())
    assert report["prefill_profile"]["steps"] >= 1 and report["prefill_profile"]["kernels_per_step"] > 0
    profile = report["profile"]
    assert profile["device"] == "cpu" and profile["steps"] == 3 and profile["kernels_per_step"] > 0
    assert any(row["name"] == "aten::linear" for row in profile["top_kernels"])


def test_bench_latency_says_when_output_is_too_short_to_profile(capsys):
    args = ["bench", "latency", "--model", "tiny-mixtral", *SMALL, "--output-len", "3", "--profile"]
    assert main(args) == 0
    assert "leaves no steady decode step to profile" in capsys.readouterr().out


def test_bench_latency_compares_with_transformers(capsys, tmp_path):
    path = tmp_path / "latency.json"
    args = ["bench", "latency", "--model", "tiny-deepseek-v2-lite", *SMALL, "--temperature", "0", "--compare-hf",
            "--output-json", str(path)]
    assert main(args) == 0
    assert "| transformers generate |" in capsys.readouterr().out
    ours, theirs = json.loads(path.read_text())["results"]
    assert theirs["engine"] == "transformers generate" and theirs["batch_size"] == 2
    assert theirs["decode_step_ms"]["p50"] > 0 and theirs["decode_tok_per_s"] > 0


def test_a_family_transformers_cannot_build_is_said_plainly(capsys, monkeypatch, tmp_path):
    def cannot_build(model, device, dtype):
        raise ValueError("Unrecognized configuration class")

    monkeypatch.setattr(throughput, "build_hf_model", cannot_build)
    path = tmp_path / "latency.json"
    assert main(["bench", "latency", "--model", "tiny-mixtral", *SMALL, "--compare-hf", "--output-json", str(path)]) == 0
    assert "--compare-hf: transformers cannot build tiny-mixtral (MixtralForCausalLM): Unrecognized" in capsys.readouterr().out
    report = json.loads(path.read_text())
    assert len(report["results"]) == 1 and "cannot build" in report["hf_error"]


def test_bench_latency_bad_lengths_are_clear_errors(capsys):
    assert main(["bench", "latency", "--model", "tiny-mixtral", *SMALL, "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err
    assert main(["bench", "latency", "--model", "tiny-mixtral", *SMALL, "--tp", "2"]) == 2
    assert "drop --tp/--dp/--ep" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "latency", "--model", "tiny-mixtral", *SMALL, "--profile", "--profile-steps", "0"])
    assert "--profile-steps: must be at least 1, got 0" in capsys.readouterr().err


def test_bench_throughput_profiles_a_window_of_steps(capsys):
    args = ["bench", "throughput", "--model", "tiny-mixtral", "--num-prompts", "3", "--input-len", "8", "--output-len",
            "6", "--profile", "--profile-steps", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "3 requests in" in printed and "profile of 2 steps of 3 prompts" in printed
