"""vdtome.measure: timers, phase split of a pipeline call, memory meters, environment (CPU only).

The CUDA code paths are exercised with fakes of ``torch.cuda`` / ``pynvml`` (no GPU here); a
separate test checks that a CPU measurement never touches ``torch.cuda`` at all.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import types

import numpy as np
import pytest
import torch

from vdtome.measure.environment import environment, environment_line
from vdtome.measure.memory import MemoryMonitor, MemoryReport
from vdtome.measure.timing import (
    DENOISING,
    END_TO_END,
    TEXT_ENCODING,
    VAE_DECODE,
    PhaseTimer,
    StepTimer,
    Stopwatch,
    phase_hooks,
    sync,
    timed_call,
)
from vdtome.offline.tiny import tiny_wan_pipeline

STEPS = 3
CALL = dict(
    prompt="a dog running on the beach",
    negative_prompt="bad quality",
    num_frames=5,
    height=32,
    width=32,
    num_inference_steps=STEPS,
    guidance_scale=5.0,
    output_type="np",
)
MB = 1024 * 1024


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_wan_pipeline()
    pipe(**CALL, generator=torch.Generator().manual_seed(0))  # warm up
    return pipe


def assert_clean(pipe):
    assert "decode" not in pipe.vae.__dict__, "vae.decode wrapper left on the instance"
    for module in (pipe.text_encoder, pipe.transformer):
        assert len(module._forward_hooks) == 0
        assert len(module._forward_pre_hooks) == 0


# -------------------------------------------------------------------------------------------- timers


def test_stopwatch_cpu():
    with Stopwatch("cpu") as sw:
        time.sleep(0.02)
    assert sw.clock == "perf_counter"
    assert 15 <= sw.elapsed_ms < 1000
    assert sw.elapsed_s == pytest.approx(sw.elapsed_ms / 1e3)


def test_phase_timer_nesting_counts_outermost_only():
    timer = PhaseTimer("cpu")
    with timer.phase("a"):
        with timer.phase("a"):
            time.sleep(0.005)
    with timer.phase("a"):
        pass
    assert timer.calls() == {"a": 2}
    with pytest.raises(RuntimeError):
        timer.end("b")


def test_step_timer_records_every_step(pipe):
    steps = StepTimer()
    pipe(**CALL, callback_on_step_end=steps)
    assert len(steps) == STEPS
    assert steps.step_indices == list(range(STEPS))
    times = steps.step_times_ms()
    assert len(times) == STEPS
    assert times[0] is None  # no start() mark: step 0 unknown
    assert all(t is not None and t > 0 for t in times[1:])


def test_step_timer_chains_callback_and_returns_kwargs(pipe):
    seen = []

    def user_callback(p, i, t, kwargs):
        seen.append(i)
        return kwargs

    steps = StepTimer("cpu", callback=user_callback)
    steps.start()
    pipe(**CALL, callback_on_step_end=steps)
    assert seen == list(range(STEPS))
    assert all(t > 0 for t in steps.step_times_ms())


def test_phase_hooks_split_a_call(pipe):
    timer, steps = PhaseTimer(pipe), StepTimer(pipe)
    with phase_hooks(pipe, timer, steps), timer.phase(END_TO_END):
        pipe(**CALL, callback_on_step_end=steps)
    assert_clean(pipe)
    report = timer.report(steps)
    phases = report.phases_ms
    assert set(phases) == {TEXT_ENCODING, DENOISING, VAE_DECODE, END_TO_END}
    for name in (TEXT_ENCODING, DENOISING, VAE_DECODE):
        assert phases[name] > 0, name
    assert phases[TEXT_ENCODING] + phases[DENOISING] + phases[VAE_DECODE] <= phases[END_TO_END]
    assert report.phase_calls[TEXT_ENCODING] == 2  # prompt + negative prompt
    assert report.phase_calls[DENOISING] == 1
    assert report.phase_calls[VAE_DECODE] == 1
    # step 0 starts at the first denoiser call, so the steps tile the denoising interval
    assert len(report.steps_ms) == STEPS and all(t > 0 for t in report.steps_ms)
    assert report.steps_total_ms <= phases[DENOISING] * 1.001
    assert report.steps_total_ms >= 0.5 * phases[DENOISING]
    json.dumps(report.to_dict())


def test_timed_call(pipe):
    output, report = timed_call(pipe, **CALL)
    assert output.frames[0].shape == (5, 32, 32, 3)
    assert report.clock == "perf_counter" and report.device == "cpu"
    assert len(report.steps_ms) == STEPS
    assert report.denoising_ms + report.text_encoding_ms + report.vae_decode_ms <= report.end_to_end_ms
    assert_clean(pipe)


def test_phase_hooks_removed_when_callback_raises(pipe):
    def boom(p, i, t, kwargs):
        raise RuntimeError("stop at step 0")

    timer = PhaseTimer("cpu")
    with pytest.raises(RuntimeError, match="stop at step 0"):
        with phase_hooks(pipe, timer, StepTimer("cpu")):
            pipe(**CALL, callback_on_step_end=boom)
    assert_clean(pipe)
    assert timer.calls()[TEXT_ENCODING] == 2
    assert VAE_DECODE not in timer.calls()
    # the pipeline still works afterwards, untimed
    assert pipe(**CALL).frames[0].shape == (5, 32, 32, 3)


def test_phase_hooks_removed_when_decode_raises(pipe):
    def fail(module, args):
        raise RuntimeError("decoder broke")

    handle = pipe.vae.decoder.register_forward_pre_hook(fail)
    timer = PhaseTimer("cpu")
    try:
        with pytest.raises(RuntimeError, match="decoder broke"):
            with phase_hooks(pipe, timer):
                pipe(**CALL)
    finally:
        handle.remove()
    assert_clean(pipe)
    calls = timer.calls()
    assert calls[VAE_DECODE] == 1 and calls[DENOISING] == 1  # the failed decode was closed, not left open
    assert timer._open == {}


def test_phase_hooks_latent_output_still_times_denoising(pipe):
    timer = PhaseTimer("cpu")
    with phase_hooks(pipe, timer):
        pipe(**{**CALL, "output_type": "latent"})
    results = timer.results_ms()
    assert results[DENOISING] > 0 and VAE_DECODE not in results
    assert_clean(pipe)


def test_phase_hooks_restore_an_existing_instance_wrapper(pipe):
    calls = []
    original = pipe.vae.decode

    def user_wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    pipe.vae.decode = user_wrapper
    try:
        with phase_hooks(pipe, PhaseTimer("cpu")):
            pipe(**CALL)
        assert pipe.vae.__dict__["decode"] is user_wrapper and calls == [1]
    finally:
        del pipe.vae.decode
    assert_clean(pipe)


# -------------------------------------------------------------------------------------------- memory


def test_memory_monitor_cpu_detects_allocation():
    with MemoryMonitor("cpu") as mon:
        block = np.ones(200 * MB // 8)  # touched: every page written
        assert block.sum() > 0
        del block  # freed before exit: only the peak can see it
    report = mon.report
    assert isinstance(report, MemoryReport)
    assert report.rss_peak_growth_bytes >= 150 * MB
    assert report.peak_bytes == report.rss_peak_growth_bytes
    assert report.samples >= 1
    for name in ("cuda_peak_allocated_bytes", "cuda_peak_reserved_bytes", "nvml_peak_used_bytes"):
        assert getattr(report, name) is None
        assert "not CUDA" in report.unavailable_reason[name]
    data = report.to_dict()
    json.dumps(data)
    assert data["cuda_peak_allocated_bytes"] is None and data["unavailable_reason"]


def test_memory_monitor_sampling_only(monkeypatch):
    monkeypatch.setattr("vdtome.measure.memory._reset_vm_hwm", lambda: False)  # as on a non-Linux system
    with MemoryMonitor("cpu", interval_s=0.002) as mon:
        block = np.ones(200 * MB // 8)
        time.sleep(0.05)
        del block
    assert mon.report.rss_method == "sampled"
    assert mon.report.rss_peak_growth_bytes >= 150 * MB


def test_nested_memory_monitors_keep_the_outer_peak():
    with MemoryMonitor("cpu") as outer:
        block = np.ones(200 * MB // 8)
        assert block.sum() > 0
        del block
        with MemoryMonitor("cpu") as inner:
            small = np.ones(MB)
            del small
    assert outer.report.rss_peak_growth_bytes >= 150 * MB
    assert inner.report.rss_peak_growth_bytes < 150 * MB


# ------------------------------------------------------------------------------ CPU never touches CUDA


def test_cpu_measurement_never_touches_torch_cuda(pipe, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda touched during a CPU measurement")

    for name in (
        "synchronize",
        "Event",
        "current_stream",
        "reset_peak_memory_stats",
        "max_memory_allocated",
        "max_memory_reserved",
        "memory_allocated",
        "memory_reserved",
        "get_device_properties",
        "get_device_name",
        "current_device",
    ):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    # is_available may be called by diffusers itself; it must not be called by vdtome.measure's modules
    real_is_available = torch.cuda.is_available

    def is_available():
        caller = sys._getframe(1).f_globals.get("__name__")
        assert not (caller or "").startswith("vdtome.measure"), "vdtome.measure asked torch.cuda.is_available on CPU"
        return real_is_available()

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    sync("cpu")
    with Stopwatch("cpu"):
        pass
    with MemoryMonitor(pipe) as mon:
        _, report = timed_call(pipe, **CALL)
    assert report.clock == "perf_counter" and mon.report.cuda_peak_allocated_bytes is None
    json.dumps(environment(pipe))


# ------------------------------------------------------------------------------ CUDA paths with fakes


class FakeEvent:
    clock = [0.0]  # fake GPU time in ms, advanced by the test

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self, stream=None):
        self.t = FakeEvent.clock[0]

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        assert self.t is not None and end.t is not None, "elapsed_time on an unrecorded event"
        return end.t - self.t


@pytest.fixture
def fake_cuda(monkeypatch):
    state = {"syncs": 0, "resets": 0, "allocated": 1000, "peak": 1000, "reserved": 4000, "peak_reserved": 4000}

    def synchronize(device=None):
        state["syncs"] += 1

    def reset(device=None):
        state["resets"] += 1
        state["peak"], state["peak_reserved"] = state["allocated"], state["reserved"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: state["peak_reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    props = types.SimpleNamespace(uuid="1234-abcd", total_memory=80 * 1024**3, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake H100")
    FakeEvent.clock[0] = 0.0
    return state


def fake_pynvml(used: list[int], init_error: Exception | None = None):
    module = types.ModuleType("pynvml")
    module.calls = []

    def nvmlInit():
        if init_error is not None:
            raise init_error
        module.calls.append("init")

    module.nvmlInit = nvmlInit
    module.nvmlShutdown = lambda: module.calls.append("shutdown")
    module.nvmlDeviceGetHandleByUUID = lambda uuid: module.calls.append(("uuid", uuid)) or "handle"
    module.nvmlDeviceGetHandleByIndex = lambda index: "handle"
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=used[0])
    module.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    module.nvmlSystemGetCudaDriverVersion = lambda: 12040
    return module


def test_cuda_timers_use_events_and_synchronise(fake_cuda):
    with Stopwatch("cuda") as sw:
        FakeEvent.clock[0] += 12.5
    assert sw.clock == "cuda_event" and sw.elapsed_ms == 12.5

    timer = PhaseTimer("cuda:0")
    steps = StepTimer("cuda:0")
    with timer.phase(DENOISING):
        steps.start()
        for i in range(3):
            FakeEvent.clock[0] += 10.0
            assert steps(None, i, 999 - i, {"latents": 1}) == {"latents": 1}
    syncs = fake_cuda["syncs"]
    report = timer.report(steps)
    assert fake_cuda["syncs"] > syncs  # results are read after a synchronisation
    assert report.clock == "cuda_event" and report.device == "cuda:0"
    assert report.phases_ms[DENOISING] == pytest.approx(30.0)
    assert report.steps_ms == (10.0, 10.0, 10.0)


def test_step_timer_refuses_cpu_clock_on_cuda_pipeline(fake_cuda):
    steps = StepTimer("cpu")
    fake_pipe = types.SimpleNamespace(_execution_device=torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match="pass device"):
        steps(fake_pipe, 0, 999, {})


def test_cuda_memory_monitor_with_nvml(fake_cuda, monkeypatch):
    used = [2_000]
    nvml = fake_pynvml(used)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    fake_cuda["allocated"] = fake_cuda["peak"] = 5_000  # a stale peak from before must be reset
    fake_cuda["peak"] = 9_999
    with MemoryMonitor("cuda:0", interval_s=0.001) as mon:
        assert fake_cuda["resets"] == 1
        fake_cuda["peak"] = 7_000
        fake_cuda["peak_reserved"] = 8_000
        used[0] = 6_000
        time.sleep(0.05)  # let the sampler see it
        used[0] = 3_000
    report = mon.report
    assert report.peak_bytes == report.cuda_peak_allocated_bytes == 7_000
    assert report.cuda_peak_reserved_bytes == 8_000
    assert report.cuda_baseline_allocated_bytes == 5_000
    assert report.nvml_baseline_used_bytes == 2_000
    assert report.nvml_peak_used_bytes == 6_000 and report.nvml_peak_growth_bytes == 4_000
    assert ("uuid", "GPU-1234-abcd") in nvml.calls and nvml.calls[-1] == "shutdown"
    assert "nvml_peak_used_bytes" not in report.unavailable_reason
    json.dumps(report.to_dict())


@pytest.mark.parametrize("broken", ["import", "init"])
def test_cuda_memory_monitor_without_nvml(fake_cuda, monkeypatch, broken):
    if broken == "import":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    else:
        monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([0], init_error=RuntimeError("driver not loaded")))
    with MemoryMonitor("cuda") as mon:
        fake_cuda["peak"] = 4_321
    report = mon.report
    assert report.cuda_peak_allocated_bytes == 4_321
    assert report.nvml_peak_used_bytes is None
    reason = report.unavailable_reason["nvml_peak_used_bytes"]
    assert ("not importable" in reason) if broken == "import" else ("nvmlInit failed" in reason)


def test_nested_cuda_monitors_keep_the_outer_peak(fake_cuda, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with MemoryMonitor("cuda") as outer:
        fake_cuda["peak"] = 50_000  # outer spike, then the inner monitor resets the counter
        with MemoryMonitor("cuda") as inner:
            fake_cuda["peak"] = 2_000
    assert inner.report.cuda_peak_allocated_bytes == 2_000
    assert outer.report.cuda_peak_allocated_bytes == 50_000


def test_environment_on_fake_cuda(fake_cuda, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([0]))
    env = environment("cuda", torch.bfloat16)
    json.dumps(env)
    assert env["device_name"] == "Fake H100" and env["compute_capability"] == "9.0"
    assert env["driver_version"] == "550.54.15" and env["cuda_driver_version"] == "12.4"
    assert env["dtype"] == "bfloat16"


def test_environment_line_on_fake_cuda(fake_cuda, monkeypatch):
    """The line a CUDA run prints names the GPU, its driver, both CUDA versions, cuDNN, the packages,
    the dtype and the attention backend: built from what environment() really returns."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")  # the runtime this torch was built with
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([0]))  # driver 550.54.15, CUDA 12040 -> 12.4
    nvml = sys.modules["pynvml"]
    nvml.nvmlSystemGetDriverVersion = lambda: b"550.54.15"  # older nvidia-ml-py returns bytes
    nvml.nvmlSystemGetCudaDriverVersion = lambda: 12060
    env = environment(torch.device("cuda"), torch.bfloat16)
    json.dumps(env)
    line = environment_line(env)
    parts = line.split(" · ")
    assert parts[0] == "Fake H100"
    assert "driver 550.54.15" in parts
    assert "CUDA 12.4 (torch), 12.6 (driver)" in parts
    assert "cuDNN 9.1.0" in parts
    assert f"torch {torch.__version__}" in parts
    assert f"diffusers {env['versions']['diffusers']}" in parts
    assert "dtype bfloat16" in parts
    assert f"attention {env['attention_backend']}" in parts and env["attention_backend"]
    assert "?" not in line and "None" not in line


def test_environment_line_leaves_unknown_parts_out(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: None)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # NVML not importable: no driver, no driver CUDA
    line = environment_line(environment("cuda"))
    assert line.startswith("Fake H100 · torch ") and "driver" not in line and "CUDA" not in line
    assert "dtype" not in line and "?" not in line and "None" not in line
    cpu = environment_line(environment("cpu", torch.float32))
    assert "driver" not in cpu and "CUDA" not in cpu and "dtype float32" in cpu
    assert environment_line({}) == ""  # nothing known, nothing invented
    old = {"device": "cuda:0", "device_name": "A100", "versions": {"torch": "2.4.0"}, "cudnn_version": 8902}
    assert environment_line(old) == "A100 · cuDNN 8.9.2 · torch 2.4.0"


# ------------------------------------------------------------------------------------------ environment


def test_environment_is_json_and_names_versions(pipe):
    env = environment(pipe)
    text = json.dumps(env)
    assert torch.__version__ in text
    assert env["versions"]["torch"] == torch.__version__
    assert "diffusers" in env["versions"] and "transformers" in env["versions"]
    assert env["device"] == "cpu" and env["dtype"] == "float32"
    assert env["device_name"] and env["cpu"]
    assert env["torch_num_threads"] >= 1
    assert env["attention"]["dispatch_backend"] == "native"
    assert env["attention"]["processors"]["transformer"]
    assert env["unavailable_reason"]["driver_version"]
    assert environment("cpu", torch.float16)["dtype"] == "float16"


_FAULTS_SCRIPT = """
import resource, sys, torch
from vdtome.measure.memory import retain_freed_host_memory
if sys.argv[1] == "retain":
    assert retain_freed_host_memory() is not None, "glibc refused the settings"
def forward():  # several activations live at once, all freed by the end
    live = [torch.ones(4 << 20) for _ in range(4)]  # 4 x 16 MiB, touched
    del live
for _ in range(5):  # warm-up: the heap settles on where the blocks go
    forward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    forward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _transparent_huge_pages() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
@pytest.mark.skipif(
    _transparent_huge_pages() == "always", reason="huge pages back fresh mappings: ten times fewer faults to count"
)
@pytest.mark.slow
def test_retain_freed_host_memory_stops_page_fault_churn():
    """From glibc's initial state (blocks over 128 KiB mapped afresh and unmapped on free, pinned
    here by its own environment variable: its adaptive threshold makes the default path-dependent)
    every forward faults its 64 MiB in again; after the call the freed blocks are reused."""
    import subprocess

    def faults(mode: str) -> int:
        # glibc.malloc.hugetlb=0: 4 KiB pages, whatever the host's glibc tunables say.
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(128 << 10), "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
        done = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True, env=env
        )
        return int(done.stdout.strip())

    pages = 10 * (64 << 20) // 4096  # ten forwards of 4 x 16 MiB
    assert faults("system") >= pages * 9 // 10
    assert faults("retain") <= pages // 5  # at most two forwards' worth while the heap settles
