"""Baseline vs accelerated on one loaded pipeline: same prompt, same seed, everything measured.

``run_comparison(request)`` resolves the request against its preset (snapping or rejecting sizes
the model cannot take), loads the pipeline once (cached), runs the baseline (or reuses a cached
baseline with the same inputs), applies the acceleration, runs again, removes it, and returns a
:class:`ComparisonResult` with latency per phase and per step, peak memory, merge statistics,
fidelity to the baseline and temporal consistency, plus the videos and a JSON file on disk.

Measurement rules: an untimed warm-up call precedes each timed call (first calls pay one-off
costs: kernel selection, allocator growth, thread start-up); the device is synchronised around
timed regions; denoising is timed apart from text encoding and VAE decode. Fidelity compares the
pipelines' float outputs, not the re-encoded mp4 files.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import video_io
from .measure import MemoryMonitor, MemoryReport, TimingReport, environment, timed_call
from .methods import apply_method, describe, method_of
from .metrics import Fidelity, Temporal, check_finite, fidelity, temporal_consistency
from .pipelines import ModelUnavailableError, PipelineCache, default_device
from .presets import ModelPreset, get_preset
from .tome import ToMeConfig

SCHEMA_VERSION = 1
MAX_PROMPT_CHARS = 1000
MAX_STEPS = 500
MAX_GUIDANCE = 50.0

# Progress reports: (stage, steps done, steps in the stage). Stages: "baseline", "accelerated".
Progress = Callable[[str, int, int], None]


class RequestError(ValueError):
    """A request the engine refuses; the message names the rule that was broken."""


class Cancelled(RuntimeError):
    """The caller asked the comparison to stop."""


@dataclass(frozen=True)
class ComparisonRequest:
    """What to compare. ``None`` sizes, steps and guidance take the preset's defaults.

    ``acceleration`` is any registered method config (see :mod:`vdtome.methods`); ``snap``: move
    invalid frame counts and sizes to the nearest valid ones (the result says so) instead of
    refusing them; ``reuse_baseline``: take the baseline from the cache when the same inputs ran
    before (its figures are then from that earlier run).
    """

    preset: str
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    acceleration: Any = field(default_factory=ToMeConfig)
    warmup_steps: int = 2  # some schedulers (LTX's shifted flow match) cannot take a 1-step call
    snap: bool = True
    reuse_baseline: bool = True


@dataclass(frozen=True)
class ResolvedSettings:
    """The request after defaults, validation and snapping: exactly what the pipeline is called with."""

    preset: str
    prompt: str
    negative_prompt: str
    seed: int
    frames: int
    height: int
    width: int
    steps: int
    guidance: float
    fps: int
    warmup_steps: int

    def call_kwargs(self) -> dict[str, Any]:
        return dict(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt or None,
            num_frames=self.frames,
            height=self.height,
            width=self.width,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
        )


@dataclass(frozen=True, eq=False)
class RunRecord:
    """One timed pipeline call and what came out of it."""

    frames: np.ndarray  # (F, H, W, 3) float in [0, 1], as the pipeline returned it
    timing: TimingReport
    memory: MemoryReport
    temporal: Temporal | None
    nonfinite_values: int
    measured_at: float  # time.time() of the call

    @property
    def seconds_per_step(self) -> float | None:
        steps = len(self.timing.steps_ms)
        return None if not steps or self.timing.denoising_ms is None else self.timing.denoising_ms / 1000 / steps

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames": int(self.frames.shape[0]),
            "height": int(self.frames.shape[1]),
            "width": int(self.frames.shape[2]),
            "latency": self.timing.to_dict(),
            "seconds_per_step": self.seconds_per_step,
            "memory": self.memory.to_dict(),
            "temporal": None if self.temporal is None else self.temporal.to_dict(),
            "nonfinite_values": self.nonfinite_values,
            "measured_at": self.measured_at,
        }


@dataclass(frozen=True, eq=False)
class ComparisonResult:
    settings: ResolvedSettings
    acceleration: dict[str, Any]
    baseline: RunRecord | None
    accelerated: RunRecord | None
    baseline_reused: bool
    method_report: dict[str, Any] = field(default_factory=dict)
    fidelity: Fidelity | None = None
    notes: tuple[str, ...] = ()
    error: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def speedup(self, phase: str = "end_to_end") -> float | None:
        if self.baseline is None or self.accelerated is None:
            return None
        base, fast = self.baseline.timing.get(phase), self.accelerated.timing.get(phase)
        return base / fast if base and fast else None

    @property
    def memory_change_bytes(self) -> int | None:
        if self.baseline is None or self.accelerated is None:
            return None
        base, fast = self.baseline.memory.peak_bytes, self.accelerated.memory.peak_bytes
        return None if base is None or fast is None else fast - base

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "ok": self.ok,
            "error": self.error,
            "notes": list(self.notes),
            "settings": vars(self.settings).copy(),
            "acceleration": self.acceleration,
            "baseline_reused": self.baseline_reused,
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "accelerated": None if self.accelerated is None else self.accelerated.to_dict(),
            "speedup": {"end_to_end": self.speedup("end_to_end"), "denoising": self.speedup("denoising")},
            "peak_memory_change_bytes": self.memory_change_bytes,
            "merge": self.method_report,
            "fidelity": None if self.fidelity is None else self.fidelity.to_dict(),
            "environment": self.environment,
            "files": self.files,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)


# ---- request validation --------------------------------------------------------------------------


def resolve(request: ComparisonRequest, preset: ModelPreset) -> tuple[ResolvedSettings, list[str]]:
    """Apply defaults and check every rule; returns the settings and notes on what was snapped."""
    prompt = (request.prompt or "").strip()
    if not prompt:
        raise RequestError("prompt is empty: describe the video to generate")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    negative = (request.negative_prompt or "").strip()
    if len(negative) > MAX_PROMPT_CHARS:
        raise RequestError(f"negative prompt is {len(negative)} characters; the limit is {MAX_PROMPT_CHARS}")
    seed = whole_number("seed", request.seed, 0, 2**63 - 1)
    steps = whole_number("steps", preset.num_inference_steps if request.steps is None else request.steps, 1, MAX_STEPS)
    warmup = whole_number("warm-up steps", request.warmup_steps, 0, MAX_STEPS)
    guidance = preset.guidance_scale if request.guidance is None else request.guidance
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise RequestError(f"guidance must be a finite number, got {guidance!r}")
    if not 0.0 <= guidance <= MAX_GUIDANCE:
        raise RequestError(f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {guidance:g}")
    method_of(request.acceleration)  # unknown method types fail here, before any work
    frames = whole_number("frames", preset.num_frames if request.frames is None else request.frames, 1, 10_000)
    height = whole_number("height", preset.height if request.height is None else request.height, 1, 10_000)
    width = whole_number("width", preset.width if request.width is None else request.width, 1, 10_000)
    notes: list[str] = []
    problems = preset.constraints.check(frames, height, width)
    if problems:
        if not request.snap:
            raise RequestError(f"{preset.name}: " + "; ".join(problems))
        frames, height, width, snapped = preset.constraints.snap(frames, height, width)
        notes.extend(f"snapped {note}" for note in snapped)
    settings = ResolvedSettings(
        preset=preset.name,
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        frames=frames,
        height=height,
        width=width,
        steps=steps,
        guidance=float(guidance),
        fps=preset.fps,
        warmup_steps=warmup,
    )
    return settings, notes


def whole_number(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in [low, high] (integral floats accepted); else a RequestError naming it."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}")
    return value


# ---- the engine ----------------------------------------------------------------------------------


class BaselineCache:
    """Baseline runs by everything that determines them; least recently used first out."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._runs: OrderedDict[tuple, RunRecord] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> RunRecord | None:
        with self._lock:
            run = self._runs.get(key)
            if run is not None:
                self._runs.move_to_end(key)
            return run

    def put(self, key: tuple, run: RunRecord) -> None:
        with self._lock:
            self._runs[key] = run
            self._runs.move_to_end(key)
            while len(self._runs) > self.capacity:
                self._runs.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._runs.clear()


class ComparisonEngine:
    """Loaded pipelines, cached baselines and output folders shared by every comparison.

    One comparison runs at a time (a lock): two runs sharing a GPU would time each other.
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        output_root: str | Path | None = None,
        keep_outputs: int = 16,
        pipelines: PipelineCache | None = None,
        baselines: BaselineCache | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.output_root = Path(output_root or Path(tempfile.gettempdir()) / "vdtome-outputs")
        self.keep_outputs = keep_outputs
        self.pipelines = pipelines or PipelineCache()
        self.baselines = baselines or BaselineCache()
        self.pipeline_calls: dict[str, int] = {"baseline": 0, "accelerated": 0, "warmup": 0}
        self._lock = threading.Lock()

    # -- public ---------------------------------------------------------------------------------

    def run(
        self,
        request: ComparisonRequest,
        out_dir: str | Path | None = None,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        source: str | None = None,
    ) -> ComparisonResult:
        """Compare; bad requests raise :class:`RequestError`, failures during the runs (out of
        memory, non-finite output) come back in ``result.error`` with the pipeline still usable."""
        try:
            preset = get_preset(request.preset)
        except KeyError as error:
            raise RequestError(str(error.args[0]) if error.args else str(error)) from None
        settings, notes = resolve(request, preset)
        with self._lock:
            pipe = self.pipelines.get(preset, self.device, source)
            return self._compare(pipe, preset, request, settings, notes, out_dir, progress, cancel, source)

    # -- internals ------------------------------------------------------------------------------

    def _compare(self, pipe, preset, request, settings, notes, out_dir, progress, cancel, source) -> ComparisonResult:
        env = environment(pipe)
        key = (settings, source, str(self.device), env.get("dtype"))
        baseline = self.baselines.get(key) if request.reuse_baseline else None
        reused = baseline is not None
        accelerated, report, error = None, {}, None
        try:
            if baseline is None:
                baseline = self._timed_run(pipe, settings, "baseline", progress, cancel)
                if baseline.nonfinite_values == 0:
                    self.baselines.put(key, baseline)
            applied = apply_method(pipe, request.acceleration)
            try:
                accelerated = self._timed_run(pipe, settings, "accelerated", progress, cancel, applied.reset)
                report = applied.report()
            finally:
                applied.remove()
        except torch.OutOfMemoryError as oom:
            error = _free_after_oom(oom, settings, "accelerated" if baseline is not None else "baseline")
        fid = None
        for name, run in (("baseline", baseline), ("accelerated", accelerated)):
            if run is not None and run.nonfinite_values:
                error = error or f"the {name} video has {run.nonfinite_values} NaN/inf values; fidelity is not computed"
        if error is None and baseline is not None and accelerated is not None:
            fid = fidelity(baseline.frames, accelerated.frames)
        notes = list(notes) + _merge_notes(request.acceleration, report)
        if reused:
            notes.append(f"baseline reused from a run at {time.strftime('%H:%M:%S', time.localtime(baseline.measured_at))}")
        result = ComparisonResult(
            settings=settings,
            acceleration=describe(request.acceleration),
            baseline=baseline,
            accelerated=accelerated,
            baseline_reused=reused,
            method_report=report,
            fidelity=fid,
            notes=tuple(notes),
            error=error,
            environment=env,
        )
        folder = Path(out_dir) if out_dir is not None else self._new_output_dir()
        return replace(result, files=write_outputs(result, folder))

    def _timed_run(self, pipe, settings: ResolvedSettings, stage: str, progress, cancel, after_warmup=None) -> RunRecord:
        call = settings.call_kwargs()
        if settings.warmup_steps:
            self.pipeline_calls["warmup"] += 1
            warmup = call | {"num_inference_steps": min(settings.warmup_steps, settings.steps)}
            self._call(pipe, warmup, settings.seed, None, cancel, stage)
            if after_warmup is not None:
                after_warmup()  # statistics must describe the timed call only
        gc.collect()
        self.pipeline_calls[stage] += 1
        measured_at = time.time()
        with MemoryMonitor(self.device) as monitor:
            frames, timing = self._call(pipe, call, settings.seed, progress, cancel, stage, timed=True)
        nonfinite = check_finite(frames, stage)
        temporal = temporal_consistency(frames) if nonfinite == 0 else None
        return RunRecord(frames, timing, monitor.report, temporal, nonfinite, measured_at)

    def _call(self, pipe, call, seed, progress, cancel, stage, timed=False):
        total = call["num_inference_steps"]

        def on_step_end(pipe, step_index, timestep, callback_kwargs):
            if cancel is not None and cancel.is_set():
                raise Cancelled("comparison cancelled")
            if progress is not None:
                progress(stage, step_index + 1, total)
            return callback_kwargs

        # A CPU generator: the same seed gives the same initial noise on every device.
        kwargs = call | dict(generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
        if not timed:
            return pipe(**kwargs, callback_on_step_end=on_step_end).frames[0], None
        output, timing = timed_call(pipe, device=self.device, callback_on_step_end=on_step_end, **kwargs)
        return np.asarray(output.frames[0]), timing

    def _new_output_dir(self) -> Path:
        """A fresh folder under ``output_root``; only the newest ``keep_outputs`` are kept."""
        self.output_root.mkdir(parents=True, exist_ok=True)
        runs = sorted((p for p in self.output_root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for old in runs[: max(0, len(runs) - self.keep_outputs + 1)]:
            shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix="run-", dir=self.output_root))


def _free_after_oom(error: BaseException, settings: ResolvedSettings, stage: str) -> str:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (
        f"out of memory during the {stage} run at {settings.frames} frames, {settings.height}x{settings.width}: "
        f"try fewer frames or a smaller size ({first_line[:200]})"
    )


def _merge_notes(config: Any, report: dict[str, Any]) -> list[str]:
    requested, effective = report.get("requested_ratio"), report.get("effective_ratio")
    if requested is None or effective is None or effective >= requested - 0.02:
        return []
    stride = getattr(config, "stride", None)
    return [
        f"effective merge ratio {effective:.2f} is below the requested {requested:.2f}: with stride {stride} only "
        f"tokens that are not a cell's destination can merge"
    ]


def write_outputs(result: ComparisonResult, folder: Path) -> dict[str, str]:
    """Both videos, the labelled side-by-side, the amplified difference, and ``result.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    fps = result.settings.fps
    files: dict[str, str] = {}
    videos = {"baseline": result.baseline, "accelerated": result.accelerated}
    for name, run in videos.items():
        if run is not None:
            files[name] = video_io.write_mp4(_displayable(run.frames), folder / f"{name}.mp4", fps=fps)
    if result.baseline is not None and result.accelerated is not None:
        base, fast = _displayable(result.baseline.frames), _displayable(result.accelerated.frames)
        files["side_by_side"] = video_io.write_mp4(video_io.side_by_side(base, fast), folder / "side_by_side.mp4", fps)
        files["difference"] = video_io.write_mp4(video_io.difference_video(base, fast), folder / "difference.mp4", fps)
    files["json"] = str(folder / "result.json")
    result = replace(result, files=files)
    Path(files["json"]).write_text(result.to_json())
    return files


def _displayable(frames: np.ndarray) -> np.ndarray:
    return np.clip(np.nan_to_num(frames, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


_default_engine: ComparisonEngine | None = None
_default_lock = threading.Lock()


def default_engine() -> ComparisonEngine:
    global _default_engine
    with _default_lock:
        if _default_engine is None:
            _default_engine = ComparisonEngine()
        return _default_engine


def run_comparison(request: ComparisonRequest, out_dir: str | Path | None = None, **kwargs) -> ComparisonResult:
    """Compare with the process-wide engine (shared pipeline and baseline caches)."""
    return default_engine().run(request, out_dir=out_dir, **kwargs)


__all__ = [
    "BaselineCache",
    "Cancelled",
    "ComparisonEngine",
    "ComparisonRequest",
    "ComparisonResult",
    "ModelUnavailableError",
    "RequestError",
    "ResolvedSettings",
    "RunRecord",
    "SCHEMA_VERSION",
    "resolve",
    "run_comparison",
]
