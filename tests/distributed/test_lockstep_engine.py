"""Data-parallel attention + EP MoE in the engine: the same greedy tokens as one process."""

import dataclasses
import subprocess
import sys

import pytest

from moeserve.distributed.launch import make_context
from moeserve.distributed.layout import ParallelLayout
from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams
from tests.distributed.harness import run_ranks
from tests.distributed.rank_scripts import fail_after_a_forward, lockstep_with_counted_calls, single_engine_stream

PROMPTS = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 19, 8)]
MAX_TOKENS = [24, 4, 6]  # the DP rank holding the short requests runs out of work and steps empty


def params():
    return [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]


def generate_on_ranks(rank, world, preset, tp, dp, ep, overlap=False):
    context = make_context(ParallelLayout(tp, dp, ep), "cpu", 60)
    llm = LLM(preset, context=context, tp=tp, dp=dp, ep=ep, max_num_batched_tokens=16, ep_two_batch_overlap=overlap)
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


def test_two_batch_overlap_gives_the_same_greedy_tokens():
    """Every eager step as two micro-batches taking turns at each exchange (prefill chunks cut in two, one part empty
    where a rank has one decode or none): MLA over DP ranks, and GQA with TP attention splitting each micro-batch's
    tokens over the EP group."""
    for preset, layout in (("tiny-deepseek-v3", (1, 2, 2)), ("tiny-qwen3-moe", (2, 1, 2))):
        expected = single_process(preset)
        for tokens, all_free, _ in run_ranks(2, generate_on_ranks, preset, *layout, True):
            assert tokens == expected and all_free


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


def by_request(outputs) -> dict[str, list]:
    """Each counted request's outputs in order; of the metrics (timings) only which there are."""
    outputs = [dataclasses.replace(o, metrics=sorted(o.metrics)) for o in outputs]
    return {request_id: [o for o in outputs if o.request_id == request_id] for request_id in ("long", "short")}


def test_one_control_collective_per_step_and_bytes_only_when_there_are_any():
    results = run_ranks(2, lockstep_with_counted_calls, 1, 2, 2)
    (coordinator, stream, _), (follower, _, follower_empty) = results
    control, assigning = {"all_gather": 1}, {"all_gather": 1, "broadcast": 1}
    assert coordinator == [control, assigning, *[{"all_gather": 1, "irecv": 1}] * 3, *[control] * 5, control]
    assert follower == [control, assigning, *[{"all_gather": 1, "send": 1}] * 3, *[control] * 5, control]
    assert follower_empty == 5  # DP group 1's request finished first: it replayed the empty forward meanwhile
    assert by_request(stream) == by_request(single_engine_stream())  # every cumulative output, text and all


def test_only_the_first_tp_rank_of_a_dp_group_sends_outputs():
    results = run_ranks(4, lockstep_with_counted_calls, 2, 2, 4)
    decoding = [counts for counts, _, _ in results]
    both_busy = [step[2] for step in decoding]  # the first decode step: both DP groups have outputs
    assert both_busy == [{"all_gather": 1, "irecv": 1}, {"all_gather": 1}, {"all_gather": 1, "send": 1},
                         {"all_gather": 1}]
    assert by_request(results[0][1]) == by_request(single_engine_stream())


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_rank_whose_step_raises_takes_every_rank_out_at_once(failing_rank):
    raised = run_ranks(2, fail_after_a_forward, failing_rank)
    own, other = raised[failing_rank], raised[1 - failing_rank]
    assert own[:2] == ("RuntimeError", f"rank {failing_rank} failed on purpose")
    assert other[0] == "LockstepFailure" and f"rank {failing_rank} failed" in other[1]
    assert own[2] < 5 and other[2] < 5  # at that step's exchange, not after the 60 s timeout


def test_generate_command_starts_the_ranks_itself():
    args = ["generate", "--model", "tiny-mixtral", "--prompt", "Hello", "--prompt", "The router",
            "--max-tokens", "6", "--temperature", "0"]  # --device auto: each rank must resolve it the same way
    single = subprocess.run([sys.executable, "-m", "moeserve", *args], capture_output=True, text=True, timeout=120)
    parallel = subprocess.run([sys.executable, "-m", "moeserve", *args, "--dp", "2", "--ep", "2"],
                              capture_output=True, text=True, timeout=180)
    assert single.returncode == 0 and parallel.returncode == 0, parallel.stderr[-2000:]
    assert parallel.stdout == single.stdout and single.stdout.count("\n") >= 2
