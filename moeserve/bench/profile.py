"""Where a step's time goes: torch.profiler over a few engine steps, reduced to the share of wall time the
device is busy (the union of its kernel intervals, so overlapping kernels count once), kernels per step
and the kernels with the most time. Without CUDA the same is done for the CPU's top-level operators."""

import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class Activity:
    """One kernel (or, profiling the CPU, one top-level operator) on the timeline."""
    name: str
    start_us: float
    duration_us: float


@dataclass(frozen=True)
class KernelRow:
    name: str
    calls_per_step: float
    ms_per_step: float
    mean_us: float


def busy_us(activities: list[Activity]) -> float:
    """Length of the union of the activities' intervals."""
    total, end = 0.0, float("-inf")
    for a in sorted(activities, key=lambda a: a.start_us):
        stop = a.start_us + a.duration_us
        if stop > end:
            total += stop - max(a.start_us, end)
            end = stop
    return total


def kernel_table(activities: list[Activity], num_steps: int) -> list[KernelRow]:
    """Per kernel name: calls and time per step, mean time per call; the most time first."""
    calls, total_us = defaultdict(int), defaultdict(float)
    for a in activities:
        calls[a.name] += 1
        total_us[a.name] += a.duration_us
    rows = [KernelRow(name, calls[name] / num_steps, total_us[name] / num_steps / 1000, total_us[name] / calls[name])
            for name in calls]
    return sorted(rows, key=lambda r: -r.ms_per_step)


@dataclass
class StepProfile:
    activities: list[Activity]
    wall_us: float  # the profiled steps, synchronized
    num_steps: int
    on_gpu: bool

    @property
    def wall_ms_per_step(self) -> float:
        return self.wall_us / self.num_steps / 1000

    @property
    def busy_percent(self) -> float:
        return 100 * busy_us(self.activities) / self.wall_us

    @property
    def busy_ms_per_step(self) -> float:
        return busy_us(self.activities) / self.num_steps / 1000

    @property
    def kernels_per_step(self) -> float:
        return len(self.activities) / self.num_steps

    def top(self, count: int = 15) -> list[KernelRow]:
        return kernel_table(self.activities, self.num_steps)[:count]

    def report(self, what: str) -> str:
        unit, busy = ("kernels", "GPU busy") if self.on_gpu else ("top-level CPU operators (no CUDA)", "in operators")
        lines = [f"profile of {self.num_steps} {what}: {self.wall_ms_per_step:.3f} ms per step, {busy} "
                 f"{self.busy_ms_per_step:.3f} ms ({self.busy_percent:.1f}%), {self.kernels_per_step:.0f} {unit} per step",
                 f"  {'ms/step':>8} {'calls/step':>10} {'mean us':>9}  name"]
        lines += [f"  {r.ms_per_step:8.3f} {r.calls_per_step:10.1f} {r.mean_us:9.1f}  {r.name[:100]}" for r in self.top()]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"device": "gpu" if self.on_gpu else "cpu", "steps": self.num_steps,
                "wall_ms_per_step": self.wall_ms_per_step, "busy_percent": self.busy_percent,
                "busy_ms_per_step": self.busy_ms_per_step, "kernels_per_step": self.kernels_per_step,
                "top_kernels": [asdict(r) for r in self.top()]}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(step: Callable[[], object], num_steps: int, device: torch.device) -> StepProfile:
    """Run step() num_steps times under torch.profiler: the device's kernels on CUDA, CPU operators elsewhere."""
    if num_steps < 1:
        raise ValueError(f"--profile-steps must be at least 1, got {num_steps}")
    return profile_until(step, lambda steps_done, _: steps_done >= num_steps, device)


def profile_until(step: Callable[[], object], done: Callable[[int, object], bool], device: torch.device) -> StepProfile:
    """Run step() under torch.profiler until done(steps so far, the last step's result) holds."""
    on_gpu = device.type == "cuda"
    synchronize(device)
    activity = ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*clears events at the end of each cycle")  # one cycle here
        with profile(activities=[activity]) as prof:
            start = time.perf_counter()
            num_steps = 0
            while True:
                result = step()
                num_steps += 1
                if done(num_steps, result):
                    break
            synchronize(device)
            wall_us = (time.perf_counter() - start) * 1e6
    return StepProfile(activities_of(prof.events(), on_gpu), wall_us, num_steps, on_gpu)


def activities_of(events, on_gpu: bool) -> list[Activity]:
    """The profiler's events as activities: device kernels and copies, or CPU operators no other op contains."""
    if on_gpu:
        chosen = [e for e in events if e.device_type == DeviceType.CUDA]
    else:
        chosen = [e for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None]
    return [Activity(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in chosen]


def profile_engine(engine, prompts: list[dict], params, num_steps: int, skip_decode_steps: int) -> StepProfile:
    """Submit the prompts, step past their prefills (until every request has its first token or one has
    finished) and `skip_decode_steps` more, profile the next num_steps steps, then abort what is left."""
    request_ids = [engine.add_request(prompt, params) for prompt in prompts]
    step_until_started(engine, request_ids)
    for _ in range(skip_decode_steps):
        engine.step()
    result = profile_steps(engine.step, num_steps, engine.device)
    abort_all(engine, request_ids)
    return result


def profile_prefill(engine, prompts: list[dict], params) -> StepProfile:
    """Submit the prompts and profile the steps until every request has its first token (or one has
    finished), each step finished before the next is launched; then abort what is left."""
    request_ids = [engine.add_request(prompt, params) for prompt in prompts]
    started: set[str] = set()

    def all_started(_, outputs) -> bool:
        started.update(o.request_id for o in outputs if o.outputs[0].token_ids)
        return len(started) == len(request_ids) or any(o.finished for o in outputs)

    with engine.synchronous_steps():  # else the step that returns the first tokens has launched a decode
        result = profile_until(engine.step, all_started, engine.device)
    abort_all(engine, request_ids)
    return result


def step_until_started(engine, request_ids: list[str]) -> None:
    started: set[str] = set()
    while len(started) < len(request_ids):
        outputs = engine.step()
        started |= {o.request_id for o in outputs if o.outputs[0].token_ids}
        if any(o.finished for o in outputs):
            break


def abort_all(engine, request_ids: list[str]) -> None:
    for request_id in request_ids:
        engine.abort(request_id)
