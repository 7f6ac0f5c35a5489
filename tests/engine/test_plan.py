"""moeserve plan: its weight figures are the built rank's parameters (every tiny preset loaded on gloo ranks, the
real-shape presets built on the meta device), it sizes the KV cache as the engine does, and a layout that cannot
fit says so with the numbers and names one that does."""

import contextlib
import io

import pytest
import torch

from moeserve.cli import main
from moeserve.config import ConfigError
from moeserve.distributed.layout import ParallelGroups, ParallelLayout
from moeserve.distributed.parallelize import ParallelOptions
from moeserve.engine.plan import CUDA_CONTEXT_BYTES, GIB, Request, plan_rank, rank_weight_bytes
from moeserve.loader.build import build_model
from moeserve.loader.model_loader import load_config, load_model
from moeserve.loader.presets import SHAPE_PRESETS, TINY_PRESETS
from moeserve.quant.apply import apply_plan, default_plan, weight_bytes_by_format
from tests.distributed.harness import run_ranks

LAYOUTS = [(2, 1, 1), (1, 2, 2), (2, 1, 2), (2, 2, 4)]  # (tp, dp, ep)


def fits_layout(config, layout: ParallelLayout) -> bool:
    try:
        layout.check_model(config)
    except ConfigError:
        return False
    return True


def built_and_planned(rank, world, tp, dp, ep, real_shapes):
    """Per tiny preset and format: (this rank's loaded parameters, plan's figure); with real_shapes, per real-shape
    preset the meta-device build with the real process groups against plan's (which has none)."""
    layout = ParallelLayout(tp=tp, dp=dp, ep=ep)
    parallel = ParallelOptions(ParallelGroups(layout, "cpu"))
    results = {}
    for preset in TINY_PRESETS:
        config = load_config(preset)
        if not fits_layout(config, layout):
            continue
        for fmt in (None, "fp8", "nvfp4"):
            model = load_model(preset, torch.bfloat16, "cpu", progress=False, quantization=fmt, parallel=parallel)
            planned = rank_weight_bytes(Request(config, layout, fmt), rank)
            results[(preset, fmt)] = (weight_bytes_by_format(model), planned)
    for preset in SHAPE_PRESETS if real_shapes else ():
        config = load_config(preset)
        if not fits_layout(config, layout):
            continue
        model = build_model(config, torch.bfloat16, "meta", parallel=parallel)
        apply_plan(model, default_plan(model, "fp8"))
        results[(preset, "fp8")] = (weight_bytes_by_format(model), rank_weight_bytes(Request(config, layout, "fp8"), rank))
    return results


@pytest.mark.parametrize("layout", [LAYOUTS[:3], LAYOUTS[3:]], ids=["2 ranks", "4 ranks"])
def test_plan_weights_equal_the_built_ranks_parameters(layout):
    for tp, dp, ep in layout:
        ranks = run_ranks(tp * dp, built_and_planned, tp, dp, ep, tp * dp == 4)  # real shapes: TP and EP at once
        assert ranks[0], "no preset fits the layout: the test would check nothing"
        for results in ranks:
            for key, (built, planned) in results.items():
                assert built == planned, (key, (tp, dp, ep))
        first = ranks[0]
        assert all(results == first for results in ranks), "the ranks of a layout hold equal shards"


def test_redundant_experts_add_whole_expert_slots():
    config = load_config("deepseek-v2-lite")
    layout = ParallelLayout(dp=2, ep=2)
    plain = rank_weight_bytes(Request(config, layout), 0)
    redundant = rank_weight_bytes(Request(config, layout, num_redundant_experts=4), 0)
    moe = config.moe
    one_expert = 3 * moe.intermediate_size * config.hidden_size * 2  # gate, up, down in bf16
    assert redundant["bfloat16"] - plain["bfloat16"] == 2 * one_expert * len(config.moe_layers)


@pytest.mark.parametrize("preset", ["tiny-deepseek-v3", "tiny-qwen3-moe"])
def test_plan_and_the_engine_agree_on_kv_tokens(preset):
    from moeserve.llm import LLM

    budget = 3 * 2**20 + 12345
    llm = LLM(preset, kv_cache_memory=budget, max_model_len=256)
    config = load_config(preset)
    planned = plan_rank(Request(config, kv_cache_memory=budget, block_size=16, max_model_len=256, dtype=torch.float32))
    runner = llm.engine.runner
    assert runner.num_blocks * runner.block_size == planned.kv_tokens > 0


def run_plan(*flags: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["plan", *flags])
    return rc, out.getvalue()


def test_a_layout_that_cannot_fit_says_so_and_names_one_that_does():
    rc, text = run_plan("--model", "deepseek-v3", "--quantization", "fp8", "--kv-cache-dtype", "fp8",
                        "--max-model-len", "32768", "--gpu", "H200")
    assert rc == 1
    assert "does NOT fit" in text and "short by" in text
    assert "smallest layout that fits: --tp 1 --dp 8 --ep 8 (8 GPUs" in text


def test_deepseek_v3_fp8_on_eight_h200():
    rc, text = run_plan("--model", "deepseek-v3", "--quantization", "fp8", "--kv-cache-dtype", "fp8",
                        "--max-model-len", "32768", "--dp", "8", "--ep", "8", "--gpu", "H200")
    assert rc == 0 and "fits:" in text
    weights = float(text.split("  weights")[1].split("GiB")[0])
    assert 90 < weights < 100  # 256 experts / 8 ranks in FP8 plus the replicated attention and embeddings
    assert "note: quantizing on load holds the bf16 shard first" in text


@pytest.mark.parametrize("flags, message", [
    (["--ep", "2", "--dp", "2", "--num-redundant-experts", "3"], "must be a multiple of ep=2"),
    (["--dp", "4", "--ep", "4", "--num-gpus", "2"], "needs 4 GPUs"),
    (["--ep", "3", "--dp", "3"], "cannot be split evenly over ep=3"),
    (["--concurrency", "0"], "at least 1"),
])
def test_bad_flags_say_what_to_do(flags, message, capsys):
    rc = main(["plan", "--model", "deepseek-v2-lite", *flags])
    assert rc != 0 and message in capsys.readouterr().err


def test_gib_figures_are_the_planned_bytes():
    config = load_config("qwen3-30b-a3b")
    memory = plan_rank(Request(config, gpu_memory=80 * GIB))
    assert memory.kv_budget == int(0.9 * 80 * GIB) - memory.weight_bytes - memory.activations - memory.graph_pool \
        - CUDA_CONTEXT_BYTES
    per_token = 48 * 2 * 4 * 128 * 2  # layers x (K, V) x KV heads x head dim x bf16
    assert memory.kv_tokens == memory.kv_budget // (16 * per_token) * 16 > 0


def test_dtype_auto_is_the_models_as_in_the_engine():
    rc, text = run_plan("--model", "tiny-deepseek-v3", "--max-model-len", "256")
    assert rc == 0 and f"({load_config('tiny-deepseek-v3').dtype.removeprefix('torch.')} " in text.split("  weights")[1]


def test_enforce_eager_plans_no_graph_pool_and_says_why():
    rc, text = run_plan("--model", "deepseek-v2-lite", "--max-model-len", "4096", "--enforce-eager")
    pool = text.split("CUDA-graph pool")[1]
    assert rc == 0 and pool.split("GiB")[0].strip() == "0.00" and "--enforce-eager" in pool.split("\n")[0]
    rc, text = run_plan("--model", "deepseek-v2-lite", "--max-model-len", "4096")
    assert float(text.split("CUDA-graph pool")[1].split("GiB")[0]) > 0


def test_smallest_layout_with_redundant_experts_has_expert_parallelism():
    from moeserve.engine.plan import smallest_fitting_layout

    request = Request(load_config("deepseek-v2-lite"), ParallelLayout(dp=2, ep=2), num_redundant_experts=4,
                      max_model_len=4096, gpu_memory=80 * GIB)
    layout, memory = smallest_fitting_layout(request, 1)
    assert layout.ep > 1 and 4 % layout.ep == 0 and memory.graph_pool > 0  # graphs under EP: p2p's low latency
    nccl = Request(load_config("deepseek-v2-lite"), ParallelLayout(dp=2, ep=2), num_redundant_experts=4,
                   max_model_len=4096, gpu_memory=80 * GIB, ep_backend="all_to_all")
    assert smallest_fitting_layout(nccl, 1)[1].graph_pool == 0  # NCCL all-to-all: no graphs under EP
