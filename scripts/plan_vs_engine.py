"""`moeserve plan` beside what a started engine measures, on this GPU (issue 16's check).

For each model and weight format: plan's per-rank figures for this card (its memory as torch reports it), then
an engine started with random weights, whose parameters, measured activation peak, memory in use at sizing,
KV tokens and, after graph capture, the memory CUDA graphs took, are read back. A short batch runs at the end
so that the plan's cache is shown to hold a full step. Prints one table; the difference column is engine / plan - 1.

    PYTHONPATH=. python3 scripts/plan_vs_engine.py deepseek-v2-lite:bf16 deepseek-v2-lite:fp8 qwen3-30b-a3b:bf16
"""

import argparse
import gc
import sys

import torch

import moeserve.engine.memory as memory
from moeserve.cli import add_plan_arguments, plan_request
from moeserve.engine.kv_cache import bytes_per_block
from moeserve.engine.plan import CUDA_CONTEXT_BYTES, plan_rank
from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams

FLAGS = ["--max-model-len", "8192", "--max-num-seqs", "128", "--max-num-batched-tokens", "8192"]
GIB = 2**30


def plan_for(model: str, quantization: str | None):
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    flags = ["--model", model, *FLAGS, "--gpu-memory", str(torch.cuda.mem_get_info()[1])]
    args = parser.parse_args(flags + (["--quantization", quantization] if quantization else []))
    request, _, _ = plan_request(args)
    return request, plan_rank(request)


def measure_engine(model: str, quantization: str | None) -> dict:
    """The engine's own figures: kv_cache_budget's inputs as it called it, its parameters, its KV tokens, and
    the memory in use after start-up beyond what sizing counted (the graphs' pool, really taken)."""
    seen = {}
    budget = memory.kv_cache_budget

    def recording_budget(gpu_memory, utilization, in_use, activations, graph_pool):
        seen.update(in_use=in_use, activations=activations, graph_pool=graph_pool,
                    allocated=torch.cuda.memory_allocated(), reserved=torch.cuda.memory_reserved())
        return budget(gpu_memory, utilization, in_use, activations, graph_pool)

    memory.kv_cache_budget = recording_budget
    try:
        llm = LLM(model, load_format="dummy", device="cuda", quantization=quantization, max_model_len=8192,
                  max_num_seqs=128, max_num_batched_tokens=8192, warm_up=False)
    finally:
        memory.kv_cache_budget = budget
    runner = llm.engine.runner
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    block_size = llm.engine.block_manager.block_size
    kv_bytes = (runner.num_blocks + 1) * bytes_per_block(runner.model.config, block_size, runner.kv_cache_dtype)
    weights = sum(t.numel() * t.element_size() for t in [*runner.model.parameters(), *runner.model.buffers()])
    seen.update(weights=weights, kv_tokens=runner.num_blocks * block_size,
                graphs_taken=(total - free) - seen["in_use"] - kv_bytes)
    outputs = llm.generate([{"prompt_token_ids": [7 + i] * 1024} for i in range(128)], SamplingParams(max_tokens=4, ignore_eos=True))
    seen["ran"] = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()
    return seen


def rows(model: str, quantization: str | None) -> list[str]:
    _, planned = plan_for(model, quantization)
    measured = measure_engine(model, quantization)
    name = f"{model} {quantization or 'bf16'}"
    pairs = [("weights", planned.weight_bytes, measured["weights"]),
             ("in use at sizing", planned.weight_bytes + CUDA_CONTEXT_BYTES, measured["in_use"]),
             ("activation peak", planned.activations, measured["activations"]),
             ("graph pool", planned.graph_pool, measured["graphs_taken"]),
             ("KV tokens", planned.kv_tokens, measured["kv_tokens"])]
    lines = []
    for what, plan_value, engine_value in pairs:
        scale = 1 if what == "KV tokens" else GIB
        unit = "" if what == "KV tokens" else " GiB"
        diff = engine_value / plan_value - 1 if plan_value else float("nan")
        lines.append(f"| {name} | {what} | {plan_value / scale:,.2f}{unit} | {engine_value / scale:,.2f}{unit} "
                     f"| {diff:+.1%} |")
    lines.append(f"| {name} | in use at sizing, by kind | | tensors {measured['allocated'] / GIB:.2f} GiB, allocator's "
                 f"free {(measured['reserved'] - measured['allocated']) / GIB:.2f} GiB, outside torch's allocator "
                 f"{(measured['in_use'] - measured['reserved']) / GIB:.2f} GiB | |")
    lines.append(f"| {name} | 128 x 1024-token prompts ran | | {measured['ran']} tokens out | |")
    return lines


def main() -> int:
    table = ["| model | figure | plan | engine | difference |", "|---|---|---|---|---|"]
    for spec in sys.argv[1:]:
        model, _, fmt = spec.partition(":")
        try:
            table += rows(model, None if fmt in ("", "bf16") else fmt)
        except Exception as error:  # one failing point must not hide the others' numbers
            table.append(f"| {spec} | FAILED | {type(error).__name__}: {error} | | |")
        print("\n".join(table[-7:]), flush=True)
    print("\n".join([torch.cuda.get_device_name(), *table]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
