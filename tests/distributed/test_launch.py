"""Launch: spawned ranks and torchrun on loopback (two "nodes" of two ranks); failures end every rank."""

import os
import subprocess
import sys
import time

import pytest

from moeserve.distributed.launch import RankFailure, launch
from moeserve.distributed.layout import ParallelLayout
from tests.distributed.harness import free_port
from tests.distributed.rank_scripts import fail_on_last_rank

GENERATE = ["generate", "--model", "tiny-deepseek-v3", "--prompt", "Hello", "--prompt", "The router scores",
            "--max-tokens", "6", "--temperature", "0", "--device", "cpu"]


def torchrun_nodes(port: int, target: list[str], timeout: float) -> list[subprocess.CompletedProcess]:
    """Two torchrun 'nodes' of two processes each, on loopback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(port)]
    nodes = [subprocess.Popen([*command, "--node-rank", str(node), *target], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for node in (0, 1)]
    results = []
    for node in nodes:
        stdout, stderr = node.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    return results


def test_failing_rank_ends_every_spawned_rank_with_its_error():
    start = time.monotonic()
    with pytest.raises(RankFailure, match="^rank 1 failed:(.|\n)*rank 1 failed on purpose"):
        launch(ParallelLayout(dp=2, ep=2), "cpu", 30.0, fail_on_last_rank)
    assert time.monotonic() - start < 60


def test_two_torchrun_nodes_on_loopback_give_the_single_process_output():
    single = subprocess.run([sys.executable, "-m", "moeserve", *GENERATE], capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-2000:]
    node0, node1 = torchrun_nodes(free_port(), ["-m", "moeserve", *GENERATE, "--dp", "4", "--ep", "4"], timeout=240)
    assert node0.returncode == 0 and node1.returncode == 0, node0.stderr[-3000:] + node1.stderr[-3000:]
    assert node0.stdout == single.stdout and node1.stdout == ""


def test_a_failing_rank_on_one_node_ends_both_nodes_within_the_timeout():
    start = time.monotonic()
    node0, node1 = torchrun_nodes(free_port(), ["tests/distributed/rank_scripts.py", "15"], timeout=180)
    assert node0.returncode != 0 and node1.returncode != 0
    assert "rank 3 failed on purpose" in node1.stderr
    assert time.monotonic() - start < 150


def test_bench_ep_reports_every_point():
    command = [sys.executable, "-m", "moeserve", "bench", "ep", "--ranks", "2", "--tokens-per-rank", "0,9",
               "--hidden", "256", "--topk", "3", "--experts", "8", "--iterations", "2", "--device", "cpu",
               "--comm-sms", "none,16"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2 * 3 * 2  # tokens x formats x backends (SM budgets apply to p2p only)
