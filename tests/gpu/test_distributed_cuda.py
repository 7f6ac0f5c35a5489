"""Expert and tensor parallelism over NCCL, one rank per GPU: one GPU's results, and greedy generation
equal to one process. Needs 2 or more GPUs."""

import os
import subprocess
import sys
import tempfile

import pytest
import torch

import moeserve
from moeserve.distributed.launch import launch
from moeserve.distributed.layout import ParallelLayout
from moeserve.distributed.parallelize import ParallelOptions

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS < 2, reason="needs 2 or more GPUs")
RANKS = max(GPUS, 2)  # layouts below are built at collection, also where the tests then skip


def batch(seed):
    return torch.randint(3, 512, (2, 33), generator=torch.Generator().manual_seed(seed))


def logits_on_rank(context, preset, fmt, backend, out_dir):
    device = f"cuda:{os.environ['LOCAL_RANK']}"
    options = ParallelOptions(context.groups, dispatch_format=fmt, backend=backend)
    model = moeserve.load_model(preset, device=device, parallel=options, progress=False)
    torch.save(model(batch(context.groups.dp_rank).to(device)).cpu(), os.path.join(out_dir, f"{context.rank}.pt"))


@pytest.mark.parametrize("layout", [ParallelLayout(dp=RANKS, ep=RANKS), ParallelLayout(tp=2, dp=RANKS // 2, ep=RANKS),
                                    ParallelLayout(tp=2, dp=RANKS // 2, ep=1)], ids=["dp-ep", "tp-attn-ep", "tp"])
@pytest.mark.parametrize("backend", ["all_to_all", "allgather", "p2p"])
def test_distributed_logits_equal_one_gpu(layout, backend):
    for preset in ("tiny-deepseek-v3", "tiny-qwen3-moe"):
        out_dir = tempfile.mkdtemp()
        launch(layout, "cuda", 120, logits_on_rank, preset, "bf16", backend, out_dir)
        reference = moeserve.load_model(preset, device="cuda:0", progress=False)
        for rank in range(layout.world_size):
            expected = reference(batch(layout.dp_index(rank)).to("cuda:0")).cpu()
            actual = torch.load(os.path.join(out_dir, f"{rank}.pt"))
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extra", [[], ["--enforce-eager"], ["--ep-backend", "all_to_all"]],
                         ids=["auto-p2p-decode-graphs", "p2p-eager", "nccl-all-to-all"])
def test_distributed_generate_equals_one_process(extra):
    """Greedy tokens of dp = ep = every GPU equal one process: with the default backend (p2p inside a node, its
    decode steps replayed as CUDA graphs in low-latency mode), with p2p eager, and over NCCL."""
    args = ["generate", "--model", "tiny-deepseek-v3", "--prompt", "Hello", "--prompt", "The router scores",
            "--prompt", "A third prompt: the ranks decode batches of different sizes", "--max-tokens", "8",
            "--temperature", "0"]
    single = subprocess.run([sys.executable, "-m", "moeserve", *args, "--device", "cuda"], capture_output=True,
                            text=True, timeout=300)
    parallel = subprocess.run([sys.executable, "-m", "moeserve", *args, "--device", "cuda", "--dp", str(GPUS),
                               "--ep", str(GPUS), *extra], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0 and parallel.returncode == 0, parallel.stderr[-3000:]
    assert parallel.stdout == single.stdout
