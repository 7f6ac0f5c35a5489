"""--profile on CUDA: the profiler's kernels of engine steps (CUDA graph replays included) come back as
activities, and bench latency runs end to end with its profile and yardstick."""

import json

import pytest
import torch

from moeserve.bench.profile import busy_us, profile_steps
from moeserve.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_profiling_cuda_steps_sees_their_kernels():
    x = torch.randn(1024, 1024, device="cuda")
    profile = profile_steps(lambda: torch.relu(x @ x), 4, torch.device("cuda"))
    assert profile.on_gpu and profile.kernels_per_step >= 2  # the GEMM and the relu
    assert busy_us(profile.activities) <= sum(a.duration_us for a in profile.activities)
    assert 0 < profile.busy_percent <= 100


def test_profiling_a_graph_replay_sees_the_kernels_inside():
    x = torch.randn(256, 256, device="cuda")
    graph = torch.cuda.CUDAGraph()
    torch.relu(x @ x)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        torch.relu(x @ x)
    assert profile_steps(graph.replay, 3, torch.device("cuda")).kernels_per_step >= 2


def test_bench_latency_on_cuda_profiles_gpu_kernels(tmp_path, capsys):
    path = tmp_path / "latency.json"
    args = ["bench", "latency", "--model", "tiny-deepseek-v3", "--device", "cuda", "--batch-size", "2", "--input-len",
            "16", "--output-len", "12", "--num-iters", "2", "--num-iters-warmup", "1", "--profile", "--compare-hf",
            "--output-json", str(path)]
    assert main(args) == 0
    assert "GPU busy" in capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["profile"]["device"] == "gpu" and report["profile"]["kernels_per_step"] > 0
    assert [r["engine"] for r in report["results"]] == ["moeserve", "transformers generate"]
