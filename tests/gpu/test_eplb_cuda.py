"""EPLB's device-side part on CUDA: the dispatcher's replica choice from its tables, after a balancer's new
map is written into them, equals the CPU's. (Moving weights between ranks needs 2 or more GPUs: the
distributed tests.)"""

import pytest
import torch

from moeserve.distributed.ep.dispatchers import AllGatherDispatcher
from moeserve.distributed.eplb import balance
from moeserve.distributed.layout import ExpertMap
from moeserve.distributed.parallelize import initial_expert_map

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def skewed_map(num_experts=16, ranks=4, redundant=4) -> ExpertMap:
    load = torch.rand(1, num_experts, generator=torch.Generator().manual_seed(3)).double()
    load[0, 5] += load.sum()  # one expert takes half the tokens
    placement = balance(load, num_experts + redundant, ranks)
    return ExpertMap(tuple(placement.physical_to_logical[0].tolist()), ranks)


@pytest.mark.parametrize("ep_rank", [0, 3])
def test_replica_choice_on_cuda_equals_cpu(ep_rank):
    initial = initial_expert_map(16, 4, 4)
    balanced = skewed_map()
    topk = torch.randint(0, 16, (257, 4), generator=torch.Generator().manual_seed(ep_rank))
    results = []
    for device in ("cpu", "cuda"):
        dispatcher = AllGatherDispatcher(initial, None, ep_rank, "bf16", torch.device(device), torch.bfloat16)
        dispatcher.move_experts(balanced)
        results.append([t.cpu() for t in dispatcher.place(topk.to(device), first_token=7)])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    with pytest.raises(ValueError, match="5 slots on each of 4 ranks"):
        dispatcher.move_experts(ExpertMap.contiguous(16, 4))
    rank, slot = results[1]
    held = torch.tensor(balanced.logical_of_slot).view(4, -1)[rank, slot]
    assert torch.equal(held, topk)  # every token goes to a slot that holds its expert
    assert len(set(rank[topk == 5].tolist())) > 1  # the hot expert's tokens spread over its replicas
