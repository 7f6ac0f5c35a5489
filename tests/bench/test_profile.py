from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from moeserve.bench.profile import (Activity, StepProfile, activities_of, busy_us, kernel_table, profile_steps,
                                    profile_until)


def test_busy_time_is_the_union_of_overlapping_intervals():
    activities = [Activity("c", 30, 5), Activity("a", 0, 10), Activity("b", 5, 10),  # overlap: [0, 15)
                  Activity("inside", 2, 3), Activity("touching", 15, 5), Activity("d", 32, 1)]  # [15, 20), [30, 35)
    assert busy_us(activities) == 25
    assert busy_us([]) == 0


def test_kernel_table_per_step_most_time_first():
    activities = [Activity("gemm", 0, 30), Activity("norm", 30, 2), Activity("gemm", 40, 10), Activity("norm", 50, 4),
                  Activity("norm", 60, 6), Activity("copy", 70, 1)]
    rows = kernel_table(activities, num_steps=2)
    assert [r.name for r in rows] == ["gemm", "norm", "copy"]
    gemm, norm, _ = rows
    assert (gemm.calls_per_step, gemm.ms_per_step, gemm.mean_us) == (1.0, pytest.approx(0.020), 20.0)
    assert (norm.calls_per_step, norm.ms_per_step, norm.mean_us) == (1.5, pytest.approx(0.006), 4.0)


def test_step_profile_busy_share_and_kernels_per_step():
    profile = StepProfile([Activity("a", 0, 40), Activity("b", 20, 40), Activity("c", 100, 20)], wall_us=200,
                          num_steps=2, on_gpu=True)
    assert profile.busy_percent == pytest.approx(40.0)  # [0, 60) and [100, 120) of 200 us
    assert profile.kernels_per_step == 1.5
    assert profile.wall_ms_per_step == pytest.approx(0.1)
    report = profile.report("decode steps")
    assert profile.busy_ms_per_step == pytest.approx(0.040)
    assert "GPU busy 0.040 ms (40.0%)" in report and "2 kernels per step" in report
    assert profile.as_dict()["top_kernels"][0]["name"] == "a"


def event(name, device_type, start, end, parent=None):
    return SimpleNamespace(name=name, device_type=device_type, cpu_parent=parent,
                           time_range=SimpleNamespace(start=start, elapsed_us=lambda: end - start))


def test_activities_are_device_kernels_on_gpu_and_top_level_operators_on_cpu():
    outer = event("aten::linear", DeviceType.CPU, 0, 10)
    events = [outer, event("aten::addmm", DeviceType.CPU, 1, 9, parent=outer),
              event("gemm_kernel", DeviceType.CUDA, 3, 8), event("Memcpy HtoD", DeviceType.CUDA, 9, 10)]
    assert activities_of(events, on_gpu=True) == [Activity("gemm_kernel", 3, 5), Activity("Memcpy HtoD", 9, 1)]
    assert activities_of(events, on_gpu=False) == [Activity("aten::linear", 0, 10)]


def test_profiling_steps_on_the_cpu_sees_their_operators():
    x = torch.randn(64, 64)
    profile = profile_steps(lambda: torch.relu(x @ x), 3, torch.device("cpu"))
    assert not profile.on_gpu and profile.num_steps == 3
    names = {a.name for a in profile.activities}
    assert {"aten::matmul", "aten::relu"} <= names
    assert 0 < profile.busy_percent <= 100


def test_profiling_until_a_condition_stops_on_the_step_that_meets_it():
    results = iter([1, 5, 2, 9, 3])
    profile = profile_until(lambda: next(results), lambda steps, last: last > 4 and steps > 2, torch.device("cpu"))
    assert profile.num_steps == 4 and next(results) == 3


def test_a_prefill_profile_under_async_scheduling_holds_the_prefill_steps_only():
    from moeserve.bench.profile import profile_prefill
    from moeserve.llm import LLM
    from moeserve.sampling_params import SamplingParams

    engine = LLM("tiny-mixtral", async_scheduling=True).engine
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    profile = profile_prefill(engine, [{"prompt_token_ids": [1, 2, 3, 4]}], params)
    assert profile.num_steps == 1 and engine.in_flight is None and engine.async_scheduling
