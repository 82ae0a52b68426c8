"""GPU time a request will take, for ZeroGPU: what to ask its scheduler for, and whether a request
fits a task's limit at all. Read from the protocol's one call schedule (loading, warm-ups, every
timed round, the decodes), with the preset's measured figures. No Gradio import.
"""

from __future__ import annotations

from vdtome.bench.runner import BenchPlan
from vdtome.core.presets import ModelPreset, get_preset
from vdtome.engine.request import ComparisonRequest, resolve
from vdtome.measure.protocol import GpuEstimate, estimate_gpu_time
from vdtome.methods import check_stack

TINY_GPU_SECONDS = 60  # built-in tiny models run in seconds; they carry no GPU figures
ROWS_PER_TINY_BUDGET = 8  # a benchmark of tiny-model rows asks for TINY_GPU_SECONDS per this many rows


def comparison_estimate(requests: list[ComparisonRequest]) -> GpuEstimate:
    """GPU time for a list of requests that share a baseline (one comparison or one sweep);
    validates the first request (a :class:`RequestError` names the broken rule)."""
    preset = get_preset(requests[0].preset)
    settings, _ = resolve(requests[0], preset)
    calibrates = any(method.prepare is not None for request in requests for method in check_stack(request.methods))
    return estimate_gpu_time(preset, settings.steps, settings.frames, settings.height, settings.width,
                             settings.rounds, points=len(requests), warmup_steps=settings.warmup_steps,
                             calibrates=calibrates, timing_steps=settings.round_steps)


def benchmark_seconds(plan: BenchPlan) -> float:
    """Each (prompt, seed) group of a benchmark is a sweep sharing one baseline."""
    return sum(comparison_estimate([plan.request(group, setting) for setting in plan.sweep.settings]).total_s
               for group in plan.groups())


def comparison_duration(preset: ModelPreset, requests: list[ComparisonRequest]) -> int:
    """Seconds to ask ZeroGPU for one comparison or sweep."""
    return TINY_GPU_SECONDS if preset.gpu_time is None else comparison_estimate(requests).seconds


def benchmark_duration(preset: ModelPreset, plan: BenchPlan) -> int:
    """Seconds to ask ZeroGPU for a benchmark."""
    if preset.gpu_time is None:
        return TINY_GPU_SECONDS * max(1, len(plan.keys()) // ROWS_PER_TINY_BUDGET)
    return int(benchmark_seconds(plan))
