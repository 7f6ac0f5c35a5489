"""LLM: the offline API, shaped like vLLM's.

With tp * dp > 1 it runs SPMD: every rank makes the same LLM and the same generate calls (under
`moeserve generate --tp/--dp/--ep`, which starts the ranks, or under torchrun); rank 0 coordinates,
and every rank gets the outputs.
"""

import torch.distributed as dist
from tqdm import tqdm

from moeserve.config import ConfigError
from moeserve.engine.args import OFFLINE_MAX_NUM_BATCHED_TOKENS, EngineArgs
from moeserve.distributed.launch import DistributedContext, init_distributed, under_torchrun
from moeserve.distributed.layout import ParallelLayout
from moeserve.engine.engine import Engine, Prompt
from moeserve.engine.lockstep import LockstepEngine
from moeserve.engine.outputs import RequestOutput
from moeserve.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, context: DistributedContext | None = None, **engine_args):
        args = EngineArgs(model=model, **{"max_num_batched_tokens": OFFLINE_MAX_NUM_BATCHED_TOKENS} | engine_args)
        layout = ParallelLayout(args.tp, args.dp, args.ep)
        if layout.world_size > 1 and context is None:
            if not under_torchrun():
                raise ConfigError(f"tp={args.tp} x dp={args.dp} needs {layout.world_size} ranks: run under torchrun, "
                                  "or use `moeserve generate|bench|serve --tp/--dp/--ep`, which starts them")
            context = init_distributed(layout, args.device, args.dist_timeout)
        self.engine = Engine(args, context)
        self.lockstep = LockstepEngine(self.engine, context) if context is not None else None

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (all are batched together); outputs come back in prompt order."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        requests = [self.engine.make_request(p, sp) for p, sp in zip(prompts, params)]  # all checked before any runs
        if self.lockstep is not None:
            return self.generate_lockstep(requests)
        for request in requests:
            self.engine.add(request)
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(requests), desc="Generating", disable=not use_tqdm) as progress:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        progress.update(1)
        return [finished[r.request_id] for r in requests]

    def generate_lockstep(self, requests) -> list[RequestOutput]:
        lockstep = self.lockstep
        finished: dict[str, RequestOutput] = {}
        if lockstep.is_coordinator:
            for request in requests:
                lockstep.submit_request(request)
            keep_going = True
            while keep_going:
                outputs, keep_going = lockstep.step(stop=lockstep.idle)
                finished.update({o.request_id: o for o in outputs if o.finished})
        else:
            lockstep.follow()
        results = [[finished[r.request_id] for r in requests] if lockstep.is_coordinator else None]
        dist.broadcast_object_list(results, src=0, group=lockstep.context.control)
        return results[0]
