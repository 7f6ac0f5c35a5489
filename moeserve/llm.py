"""LLM: the offline API, shaped like vLLM's."""

from tqdm import tqdm

from moeserve.config import EngineArgs
from moeserve.engine.engine import Engine, Prompt
from moeserve.engine.outputs import RequestOutput
from moeserve.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **engine_args):
        self.engine = Engine(EngineArgs(model=model, **engine_args))

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
