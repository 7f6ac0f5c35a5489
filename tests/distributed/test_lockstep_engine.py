"""Data-parallel attention + EP MoE in the engine: the same greedy tokens as one process."""

import subprocess
import sys


from moeserve.distributed.launch import make_context
from moeserve.distributed.layout import ParallelLayout
from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams
from tests.distributed.harness import run_ranks

PROMPTS = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 19, 8)]
MAX_TOKENS = [24, 4, 6]  # the DP rank holding the short requests runs out of work and steps empty


def params():
    return [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]


def generate_on_ranks(rank, world, preset, tp, dp, ep):
    context = make_context(ParallelLayout(tp, dp, ep), "cpu", 60)
    llm = LLM(preset, context=context, tp=tp, dp=dp, ep=ep, max_num_batched_tokens=16)
    outputs = llm.generate(PROMPTS, params())
    engine = llm.engine
    all_free = engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [o.outputs[0].token_ids for o in outputs], all_free, engine.runner.empty_steps


def single_process(preset):
    return [o.outputs[0].token_ids for o in LLM(preset, max_num_batched_tokens=16).generate(PROMPTS, params())]


def test_dp2_ep2_greedy_equals_one_process():
    expected = single_process("tiny-deepseek-v3")
    results = run_ranks(2, generate_on_ranks, "tiny-deepseek-v3", 1, 2, 2)
    for tokens, all_free, _ in results:
        assert tokens == expected and all_free
    assert max(empty for _, _, empty in results) > 0  # one DP rank ran out of requests and kept stepping


def test_tp2_attention_dp2_ep4_greedy_equals_one_process():
    expected = single_process("tiny-qwen3-moe")
    for tokens, all_free, _ in run_ranks(4, generate_on_ranks, "tiny-qwen3-moe", 2, 2, 4):
        assert tokens == expected and all_free


def abort_and_reuse_the_id(rank, world):
    llm = LLM("tiny-deepseek-v3", context=make_context(ParallelLayout(1, 2, 2), "cpu", 60), tp=1, dp=2, ep=2)
    lockstep = llm.lockstep
    if not lockstep.is_coordinator:
        lockstep.follow()
        return None
    lockstep.submit({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=500, ignore_eos=True), "r")
    for _ in range(3):
        lockstep.step()
    lockstep.abort("r")
    lockstep.submit({"prompt_token_ids": [8, 9]}, SamplingParams(max_tokens=4, ignore_eos=True), "r")  # the id is free
    finished = []
    while not lockstep.idle:
        finished += [o for o in lockstep.step()[0] if o.finished]
    lockstep.step(stop=True)
    return [(o.prompt_token_ids, len(o.outputs[0].token_ids)) for o in finished]


def test_an_aborted_request_id_can_be_reused_at_once():
    coordinator, _ = run_ranks(2, abort_and_reuse_the_id)
    assert coordinator == [([8, 9], 4)]  # only the new request finishes; the old one was aborted first


def test_generate_command_starts_the_ranks_itself():
    args = ["generate", "--model", "tiny-mixtral", "--prompt", "Hello", "--prompt", "The router",
            "--max-tokens", "6", "--temperature", "0"]  # --device auto: each rank must resolve it the same way
    single = subprocess.run([sys.executable, "-m", "moeserve", *args], capture_output=True, text=True, timeout=120)
    parallel = subprocess.run([sys.executable, "-m", "moeserve", *args, "--dp", "2", "--ep", "2"],
                              capture_output=True, text=True, timeout=180)
    assert single.returncode == 0 and parallel.returncode == 0, parallel.stderr[-2000:]
    assert parallel.stdout == single.stdout and single.stdout.count("\n") >= 2
