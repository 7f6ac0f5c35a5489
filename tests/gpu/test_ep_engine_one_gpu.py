"""The engine under expert parallelism with the p2p backend, its EP ranks as processes sharing one GPU (gloo for the
process group, symmetric memory mapped twice on the device): greedy tokens equal one process, with decode steps
replayed as CUDA graphs in low-latency mode, eager, and with two-batch overlap and the puts on their own stream; and
with TP attention over the same two ranks.
The multi-GPU form of these runs is tests/gpu/test_distributed_cuda.py."""

import os

import pytest
import torch

from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 19, 8, 40)]
MAX_TOKENS = [24, 4, 6, 9]  # the DP rank holding the short requests runs out of work and steps empty
ENGINE = dict(max_num_batched_tokens=64, kv_cache_memory=2**28, cuda_graph_sizes=(1, 2, 4))


def params():
    from moeserve.sampling_params import SamplingParams

    return [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]


def generate_on_rank(rank, world, extra, tp_attention):
    from moeserve.distributed.launch import make_context
    from moeserve.distributed.layout import ParallelLayout
    from moeserve.llm import LLM

    os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"  # both ranks' buffers on the one GPU
    torch.cuda.set_device(0)
    layout = dict(tp=2, ep=2) if tp_attention else dict(dp=2, ep=2)
    context = make_context(ParallelLayout(**layout), "cuda", 120)
    llm = LLM("tiny-deepseek-v3", context=context, device="cuda", **layout, **ENGINE, **extra)
    runner = llm.engine.runner
    assert runner.ep_transport is not None  # the p2p backend
    outputs = llm.generate(PROMPTS, params())
    return [o.outputs[0].token_ids for o in outputs], runner.graphs is not None, runner.empty_steps


@pytest.mark.parametrize("extra,tp_attention", [({}, False), ({"enforce_eager": True}, False),
                                                ({"ep_two_batch_overlap": True, "ep_comm_sms": 8}, False),
                                                ({"ep_two_batch_overlap": True}, False),
                                                ({"enforce_eager": True}, True)],
                         ids=["decode-graphs", "eager", "two-batch-overlap-side-stream", "two-batch-overlap-inline",
                              "tp-attention-eager"])
def test_p2p_engine_on_two_ranks_of_one_gpu_equals_one_process(extra, tp_attention):
    """DP attention + EP, and TP attention + EP (each TP rank dispatches its share of the tokens; eager: the TP
    all-reduce goes over gloo here, which a CUDA graph cannot capture)."""
    from moeserve.llm import LLM

    expected = [o.outputs[0].token_ids for o in LLM("tiny-deepseek-v3", device="cuda", **ENGINE).generate(
        PROMPTS, params())]
    results = run_ranks(2, generate_on_rank, extra, tp_attention)
    for tokens, graphs, _ in results:
        assert tokens == expected
        assert graphs == (not extra.get("enforce_eager", False))
    if not tp_attention:  # DP: the rank with the short requests steps empty
        assert max(empty for _, _, empty in results) > 0


def test_nvfp4_dispatch_on_two_ranks_of_one_gpu_equals_one_process_quantizing_the_same_way():
    """NVFP4 tokens on the wire, read by the experts as they arrived (decode steps replayed as CUDA graphs): greedy
    tokens equal one process whose MoE layers put each token through the same NVFP4 quantization."""
    from moeserve.distributed.ep.token_formats import Nvfp4Format
    from moeserve.layers.moe.dispatch import LocalDispatcher
    from moeserve.llm import LLM

    llm = LLM("tiny-deepseek-v3", device="cuda", enforce_eager=True, **ENGINE)
    dispatchers = [m for m in llm.engine.runner.model.modules() if isinstance(getattr(m, "dispatcher", None),
                                                                              LocalDispatcher)]
    assert dispatchers
    for module in dispatchers:
        module.dispatcher.token_format = Nvfp4Format()
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params())]
    for tokens, graphs, _ in run_ranks(2, generate_on_rank, {"ep_dispatch_format": "nvfp4"}, False):
        assert graphs and tokens == expected
