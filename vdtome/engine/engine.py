"""Baseline vs accelerated on one loaded pipeline: same prompt, same seed, everything measured.

``compare(request)`` resolves the request against its preset (snapping or rejecting sizes
the model cannot take), loads the pipeline once (cached) and runs the timing protocol of
:mod:`vdtome.measure.protocol`: warm-ups, then rounds of one baseline and one accelerated call made back
to back in alternating order, the first round decoding both videos (the baseline's comes from the
cache when the same inputs ran before: its video is reused, never its timing). It returns a
:class:`ComparisonResult` with the protocol's figures (paired speedups with intervals, untouched
phases as a noise check, peak memory), method statistics, fidelity to the baseline and temporal
consistency, plus the videos and a JSON file on disk.

Fidelity compares the pipelines' float outputs, not the re-encoded mp4 files.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vdtome.core.denoisers import denoiser_types, denoisers_of, pipeline_weight_bytes
from vdtome.core.frames import check_finite
from vdtome.core.presets import ModelPreset, get_preset
from vdtome.core.validation import RequestError
from vdtome.engine.fidelity import fidelity, temporal_consistency
from vdtome.engine.outputs import write_outputs
from vdtome.engine.plan import PlanCheck, sizer_for
from vdtome.methods.offload import Offload, already_offloaded
from vdtome.engine.pipelines import PipelineCache, default_device
from vdtome.engine.request import (
    ComparisonRequest,
    ComparisonResult,
    MethodResult,
    ResolvedSettings,
    VideoRun,
    resolve,
    unknown_words_note,
)
from vdtome.engine.storage import prune
from vdtome.measure.environment import environment
from vdtome.measure.compilation import CompilationReport, CompileActivity, CompileWatch
from vdtome.measure.host_load import HostLoadMonitor
from vdtome.measure.memory import MemoryMonitor, TensorMemoryMeter, is_allocation_failure, release_memory
from vdtome.measure.noise import NoiseStore, NoiseThreshold, default_noise_dir
from vdtome.measure.protocol import (
    ACCELERATED,
    BASELINE,
    METERED,
    PIPELINE_WARMUP,
    TENSOR_PEAK,
    TIMED,
    MemoryFigures,
    Schedule,
    TimedCall,
    aa_log_ratios,
    plan_calls,
    summarise,
)
from vdtome.measure.timing import DENOISING, TEXT_ENCODING, timed_call
from vdtome.methods import (
    AppliedStack,
    CallPlan,
    MethodReport,
    check_available,
    check_stack,
    config_fields,
    prepare_stack,
    stack_label,
    steps_alike,
)


# The compile phase's most rounds of both sides: dynamo recompiles once after the other side's hooks
# change what it guards on, so two rounds compile and the third should find everything made.
COMPILE_ROUNDS = 4


class Cancelled(RuntimeError):
    """The caller asked the comparison to stop."""


@dataclass(frozen=True)
class ProgressEvent:
    """One finished denoising step of the protocol.

    ``stage``: ``"baseline"`` or ``"accelerated"`` in a round, else the warm-up that runs (e.g.
    ``"warm-up · accelerated"``); ``round``: 1-based (None in warm-ups); ``done`` / ``total``: steps of the whole request, for one progress bar;
    ``decoding``: this was the last step of a call that now decodes its video. Work outside the
    denoising loops (metrics, writing) is announced with ``steps == 0``: no stretch goes unnamed.
    """

    stage: str
    round: int | None
    rounds: int
    step: int
    steps: int
    done: int
    total: int
    decoding: bool = False

    @property
    def label(self) -> str:
        if self.steps == 0:  # work between denoising loops (metrics, writing the files)
            return self.stage
        where = f"round {self.round}/{self.rounds} · {self.stage}" if self.round else self.stage
        if self.decoding:
            return f"{where} · decoding the video"
        return f"{where} · step {self.step}/{self.steps}"


Progress = Callable[[ProgressEvent], None]


# ---- the engine ----------------------------------------------------------------------------------


class BaselineCache:
    """Baseline videos by everything that determines them; least recently used first out."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._runs: OrderedDict[tuple, VideoRun] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> VideoRun | None:
        with self._lock:
            run = self._runs.get(key)
            if run is not None:
                self._runs.move_to_end(key)
            return run

    def put(self, key: tuple, run: VideoRun) -> None:
        with self._lock:
            self._runs[key] = run
            self._runs.move_to_end(key)
            while len(self._runs) > self.capacity:
                self._runs.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._runs.clear()


class ComparisonEngine:
    """Loaded pipelines, cached baseline videos and output folders shared by every comparison.

    One comparison runs at a time (a lock): two runs sharing a device would time each other.
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        output_root: str | Path | None = None,
        keep_outputs: int = 16,
        keep_bytes: int = 2 * 2**30,
        pipelines: PipelineCache | None = None,
        baselines: BaselineCache | None = None,
        noise_dir: str | Path | None | bool = True,
    ) -> None:
        """``noise_dir``: where this host's A/A pairs are kept (:mod:`vdtome.measure.noise`; True: the
        default folder, None: in memory for this engine only)."""
        self.device = torch.device(device) if device is not None else default_device()
        self.output_root = Path(output_root or Path(tempfile.gettempdir()) / "vdtome-outputs")
        self.keep_outputs = keep_outputs
        self.keep_bytes = keep_bytes
        self.pipelines = pipelines or PipelineCache()
        self.baselines = baselines or BaselineCache()
        self.noise_dir = default_noise_dir() if noise_dir is True else noise_dir
        self._noise: NoiseStore | None = None
        self._warmed: weakref.WeakKeyDictionary[Any, set[tuple[int, int, int]]] = weakref.WeakKeyDictionary()
        # What compiling each stack found on each pipeline (dynamo keeps the graphs for later requests).
        self._compiled: weakref.WeakKeyDictionary[Any, dict[str, CompileActivity]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    # -- public ---------------------------------------------------------------------------------

    def run(
        self,
        request: ComparisonRequest,
        out_dir: str | Path | None = None,
        progress: Progress | None = None,
        cancel: Any = None,
        source: str | None = None,
        write: bool = True,
    ) -> ComparisonResult:
        """Compare; bad requests raise :class:`RequestError`, allocation failures and non-finite
        outputs come back in ``result.error`` with the pipeline still usable. ``cancel``: anything
        with ``is_set()`` (a ``threading.Event``, a :class:`vdtome.web.cancel.CancelFlag`), checked at
        every denoising step. ``write=False``: return the result without writing videos, frames or
        ``result.json`` (a benchmark keeps its rows only)."""
        try:
            preset = get_preset(request.preset)
        except KeyError as error:
            raise RequestError(str(error.args[0]) if error.args else str(error)) from None
        settings, notes = resolve(request, preset)
        if preset.hub_id is not None and source is None:
            check_fits(preset, settings, self.device)  # before loading weights it may not hold
        with self._lock:
            started = time.perf_counter()
            pipe = self.pipelines.get(preset, self.device, source)
            if source is not None:
                check_fits(preset, settings, self.device, pipe, source)  # sized from the loaded pipeline
            notes = [*notes, *unknown_words_note(pipe, settings.prompt)]
            session = _Session(self, pipe, preset, settings, request.methods, progress, cancel)
            session.stop_if_cancelled()  # cancelled while the weights loaded
            return self._compare(session, request, notes, out_dir, source, write, started)

    # -- internals ------------------------------------------------------------------------------

    def _compare(self, session: _Session, request, notes, out_dir, source, write=True,
                 started: float | None = None) -> ComparisonResult:
        pipe, settings, methods = session.pipe, session.settings, session.methods
        env = environment(pipe)
        # A stack modifier (torch.compile) changes the baseline's video too: it keys the cache.
        key = (settings.video_key(), source, str(self.device), env.get("dtype"), session.modifiers_label)
        cached = self.baselines.get(key) if request.reuse_baseline else None
        size = (settings.frames, settings.height, settings.width)
        schedule = plan_calls(settings.rounds, settings.steps, settings.round_steps, settings.warmup_steps,
                              warm_pipeline=size not in self._warmed.get(pipe, ()), decode_baseline=cached is None,
                              meter_memory=self._meters_memory(methods))
        session.plan(schedule)
        videos: dict[str, VideoRun | None] = {BASELINE: cached, ACCELERATED: None}
        calls: list[TimedCall] = []
        metered: dict[str, Metered] = {}
        reports: tuple[MethodReport, ...] = ()
        error = None
        load = HostLoadMonitor()
        modified = contextlib.ExitStack()
        try:
            # A method the model cannot take fails before any work (a calibration that runs out of
            # memory is reported like any other allocation failure).
            session.check_methods()
            modified.enter_context(session.modified())  # both sides, for every call from here
            session.settle()
            for planned in schedule.calls:
                if planned.kind == METERED:
                    metered[planned.side] = session.metered(planned.side, planned.steps)
                    continue
                if planned.kind != TIMED:
                    session.warm_up(planned.side, decode=planned.kind == PIPELINE_WARMUP)
                    if planned.kind == PIPELINE_WARMUP:
                        self._warmed.setdefault(pipe, set()).add(size)
                    continue
                if not calls:
                    load.__enter__()  # from the first timed call: what else ran while they did
                elif planned.round == 2 and calls[-1].round == 1:
                    gc.collect()  # once: the timed calls themselves run with collection paused
                call, video, side_reports = session.timed(planned.side, planned.round, planned.decode, planned.steps)
                calls.append(call)
                if video is not None:
                    videos[planned.side] = video
                    if planned.side == BASELINE and video.nonfinite_values == 0:
                        self.baselines.put(key, video)
                if side_reports is not None and planned.decode:
                    reports = side_reports
            load.__exit__(None, None, None)
        except (RuntimeError, MemoryError) as failure:
            if isinstance(failure, Cancelled) or not is_allocation_failure(failure):
                raise
            error = _allocation_message(failure, session)
        finally:
            modified.close()
        if error is not None:
            release_memory(self.device)  # the exception and its frames (the failed run's tensors) are gone now

        for name, run in (("baseline", videos[BASELINE]), ("accelerated", videos[ACCELERATED])):
            if run is not None and run.nonfinite_values:
                error = error or f"the {name} video has {run.nonfinite_values} NaN/inf values; fidelity is not computed"
        timing = None
        compilation = self._remember_compiling(pipe, request.methods, session.compilation())
        if error is None:
            # The phases the stack acted in, as its methods report them; the other phases are shown
            # unchanged and double as a noise check.
            touches = frozenset().union(*(r.phases for r in reports)) if reports else \
                frozenset({DENOISING}) if methods else frozenset()
            timing = summarise(calls, touches, steps_alike(request.methods), None if cached is None else cached.memory,
                               per_step=settings.short_rounds, host_load=load.load,
                               noise=self._noise_threshold(settings, env, calls, keep=load.load is None or not load.load.busy,
                                                           modifiers=session.modifiers_label and f"|{session.modifiers_label}"))
            if len(metered) == 2:  # on a CPU: exact tensor peaks replace the process's RSS growth
                timing = replace(timing, memory=tuple(
                    MemoryFigures(scope, TENSOR_PEAK, (getattr(metered[BASELINE], attribute),),
                                  (getattr(metered[ACCELERATED], attribute),))
                    for scope, attribute in (("whole call", "peak_bytes"), ("denoising", "denoising_bytes"))))
            compiling = compilation.timing_problem() if compilation is not None else None
            if compiling:
                timing = timing.without_claim(compiling)
            # A modifier on both sides (the compiled baseline too) makes no difference between them.
            differing = [(m, r) for m, r, shared in zip(methods, reports, session.shared) if not shared]
            idle = [m.label for m, r in differing if r.evidence and not r.acted]
            if reports and differing and len(idle) == len(differing):
                timing = timing.without_claim(f"{' and '.join(idle)} did nothing in this run (every evidence count is "
                                              "0), so both sides computed the same")
            elif reports and not differing:
                timing = timing.without_claim(f"{session.modifiers_label} is applied to both sides and nothing else "
                                              "is: both sides computed the same")
        base, fast = videos[BASELINE], videos[ACCELERATED]
        plan_check = None
        if error is None and (self.device.type == "cuda" or any(m.changes_memory for m in methods)):
            session.announce("estimating both sides' peak memory (the memory plan)")
            plan_check = _plan_check(settings, session.configs_for(settings.steps), metered, timing, pipe, source)
        fid = None
        if base is not None and fast is not None and not base.nonfinite_values and not fast.nonfinite_values:
            session.announce("fidelity to the baseline (PSNR, SSIM)")
            fid = fidelity(base.frames, fast.frames)
        notes = list(notes) + [note for report in reports for note in report.notes]
        notes += [f"{method.label} did nothing in this run (every evidence count is 0): its settings never "
                  "triggered here, so its side computed what the baseline did"
                  for method, report in zip(methods, reports) if report.evidence and not report.acted]
        if cached is not None:
            made = time.strftime("%H:%M:%S", time.localtime(cached.measured_at))
            notes.append(f"baseline video reused from the cache (made at {made}); its timing was measured again "
                         "in this request's rounds")
        result = ComparisonResult(
            settings=settings,
            methods=tuple(MethodResult(m.name, m.label, config_fields(c), r) for m, c, r in zip(
                methods, session.configs_for(settings.steps) if reports else request.methods,
                reports or tuple(MethodReport(m.name) for m in methods))),
            stack=stack_label(request.methods),
            baseline=base,
            accelerated=fast,
            baseline_reused=cached is not None,
            timing=timing,
            fidelity=fid,
            notes=tuple(notes),
            error=error,
            environment=env,
            elapsed_s=None if started is None else time.perf_counter() - started,
            memory_plan=plan_check,
            compilation=compilation,
        )
        session.stop_if_cancelled()
        if not write:
            return result
        session.announce("writing the videos, frames and result.json")
        folder = Path(out_dir) if out_dir is not None else self._new_output_dir()
        return replace(result, files=write_outputs(result, folder))

    def _remember_compiling(self, pipe, configs, report: CompilationReport | None) -> CompilationReport | None:
        """``report`` with what compiling the same stack on ``pipe`` found before (its graph breaks)."""
        if report is None:
            return None
        seen = self._compiled.setdefault(pipe, {})
        label = stack_label(configs)
        earlier = seen.get(label)
        if report.total.compiled:
            seen[label] = report.total + (earlier or CompileActivity())
        return replace(report, earlier=earlier)

    def _meters_memory(self, methods) -> bool:
        """Whether to count both sides' tensor memory in extra untimed calls: on a CPU (no exact
        allocator peak), for a stack that changes what a call holds."""
        return self.device.type == "cpu" and any(m.changes_memory for m in methods)

    def _noise_threshold(self, settings: ResolvedSettings, env: dict[str, Any], calls: list[TimedCall],
                         keep: bool = True, modifiers: str = "") -> NoiseThreshold:
        """This request's A/A pairs with this host's record for the same preset, size and step
        counts; the noise threshold for its number of rounds from all of them. ``keep``: add them
        to the record (not when other processes shared the cores: the record is of this host's
        own noise, and a neighbour's load would raise every later threshold)."""
        if self._noise is None:
            self._noise = NoiseStore(self.noise_dir, env)
        s = settings
        key = (f"{s.preset}|{s.frames}x{s.height}x{s.width}|{s.steps}+{s.round_steps} steps|"
               f"{'mean step' if s.short_rounds else 'loop'}|{env.get('device')}|{env.get('dtype')}{modifiers}")
        pairs = aa_log_ratios(calls, s.short_rounds)
        pooled = self._noise.add(key, pairs) if keep else self._noise.pairs(key) + pairs
        return NoiseThreshold.from_pairs(pooled, s.rounds)

    def discard(self, files: dict[str, str]) -> None:
        """Delete the output folder of a result nobody will be shown (only under ``output_root``)."""
        root = self.output_root.resolve()
        for folder in {Path(path).resolve().parent for path in files.values()}:
            if folder.is_relative_to(root) and folder != root:
                shutil.rmtree(folder, ignore_errors=True)

    def _new_output_dir(self) -> Path:
        """A fresh folder under ``output_root``; the older ones are pruned to ``keep_outputs``
        folders and ``keep_bytes`` (the new one's videos come on top)."""
        self.output_root.mkdir(parents=True, exist_ok=True)
        prune(self.output_root, max(self.keep_outputs - 1, 0), self.keep_bytes)
        return Path(tempfile.mkdtemp(prefix="run-", dir=self.output_root))


class _Session:
    """The calls of one comparison on one pipeline: warm-ups and timed calls, with progress,
    cancellation and the acceleration applied only around the accelerated calls."""

    def __init__(self, engine: ComparisonEngine, pipe, preset: ModelPreset, settings: ResolvedSettings,
                 configs: tuple[Any, ...], progress: Progress | None, cancel: Any) -> None:
        self.engine, self.pipe, self.preset, self.settings, self.configs = engine, pipe, preset, settings, configs
        self.methods = check_stack(configs)
        self._prepared: dict[int, tuple[Any, ...]] = {}
        # Stack modifiers (torch.compile): applied around both sides' calls for the whole schedule.
        self.shared = tuple(method.both_sides(config) for method, config in zip(self.methods, configs))
        self.modifiers_label = stack_label([c for c, shared in zip(configs, self.shared) if shared]) \
            if any(self.shared) else ""
        self._modifiers: AppliedStack | None = None
        self._compile_phase: CompileActivity | None = None  # None: the stack has no compile phase
        self._compile_rounds = 0
        self._settled = False
        self._watched = {"warm-ups": CompileActivity(), "timed": CompileActivity()}
        self.progress, self.cancel = progress, cancel
        self.parameters = frozenset(inspect.signature(type(pipe).__call__).parameters)
        self.stage = "loading"
        self.done = self.total = 0
        self.last_step_end = 0.0
        self.last_step_s: float | None = None  # wall time of the latest denoising step (after a call's first)

    @property
    def warmup_steps(self) -> int:
        return min(self.settings.warmup_steps, self.settings.steps)

    def plan(self, schedule: Schedule) -> None:
        self.total = schedule.total_steps

    def stop_if_cancelled(self) -> None:
        """Raise :class:`Cancelled` when the caller asked to stop (checked at every denoising step,
        before and after every call and before anything is written: abandoned work leaves no files)."""
        if self.cancel is not None and self.cancel.is_set():
            message = f"comparison cancelled after {self.done} of {self.total} denoising steps"
            set_at = getattr(self.cancel, "set_at", lambda: None)()
            if set_at is not None:
                message += f", {1000 * (time.time() - set_at):.0f} ms after the cancel"
                if self.last_step_s is not None:
                    message += f" (the last step took {1000 * self.last_step_s:.0f} ms)"
            raise Cancelled(message)

    def announce(self, stage: str) -> None:
        """Name work that has no denoising steps (the progress display shows it)."""
        self.stage = stage
        if self.progress is not None:
            self.progress(ProgressEvent(stage, None, self.settings.rounds, 0, 0, self.done, self.total))

    def check_methods(self) -> None:
        """Every method can serve this model and its config applies (then removed): a stack the
        model cannot take is refused before any work, never mid-run."""
        check_available(self.methods, denoiser_types(self.pipe))
        try:
            for steps in sorted({self.warmup_steps, self.settings.steps, self.settings.round_steps}):  # calibrations run here
                AppliedStack(self.pipe, self.configs_for(steps)).remove()
        except (TypeError, ValueError) as error:
            raise RequestError(str(error)) from None

    @contextlib.contextmanager
    def modified(self) -> Iterator[None]:
        """The stack's modifiers applied for the block, around both sides' calls."""
        if not self.modifiers_label:
            yield
            return
        configs = self.configs_for(self.settings.steps)
        self._modifiers = AppliedStack(self.pipe, [c for c, shared in zip(configs, self.shared) if shared])
        try:
            yield
        finally:
            self._modifiers.remove()

    def settle(self) -> None:
        """The compile phase: for a stack with a method that compiles, whole calls of both sides
        (untimed, latents only) until a round compiles nothing new, at most :data:`COMPILE_ROUNDS`; a
        graph the timed rounds still compile is then reported, and their verdict withdrawn."""
        if not any(method.settles for method in self.methods):
            return
        steps = self.settings.steps
        self._compile_phase = CompileActivity()
        for number in range(1, COMPILE_ROUNDS + 1):
            with CompileWatch() as watch:
                for side in (BASELINE, ACCELERATED):
                    with self._applied(side, steps), self._refused_if_uncompilable(side):
                        self._untimed(f"compile phase · {side} (round {number})", steps)
            self._compile_phase += watch.activity
            self._compile_rounds = number
            if not watch.activity.compiled:
                self._settled = True
                return

    @contextlib.contextmanager
    def _refused_if_uncompilable(self, side: str) -> Iterator[None]:
        """Dynamo's refusal (a graph break under full graph, an operation it cannot trace) as a
        :class:`RequestError` naming the side and the method that compiles."""
        try:
            yield
        except RuntimeError as error:
            if not type(error).__module__.startswith("torch._dynamo"):
                raise
            compiler = next(method for method in self.methods if method.settles)
            what = "the model itself" if side == BASELINE else "the stack on the accelerated side"
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise RequestError(f"{compiler.label} failed: {what} cannot be compiled as asked ({reason})",
                               compiler.enable_field) from None

    def compilation(self) -> CompilationReport | None:
        """What dynamo did in this comparison (None: nothing was compiled and no modifier asked to)."""
        warmups, timed = self._watched["warm-ups"], self._watched["timed"]
        if self._compile_phase is None and not (warmups.compiled or timed.compiled):
            return None
        return CompilationReport(self._compile_phase, self._compile_rounds, self._settled, warmups, timed)

    @contextlib.contextmanager
    def _watch(self, kind: str) -> Iterator[None]:
        """A call whose compiling is added to ``kind``'s ("warm-ups", "timed")."""
        with CompileWatch() as watch:
            yield
        self._watched[kind] += watch.activity

    def configs_for(self, steps: int) -> tuple[Any, ...]:
        """The stack's configs for calls of ``steps`` steps: methods with a ``prepare`` (a step
        count, a calibration run) fill theirs in once per step count, untimed."""
        if steps not in self._prepared:
            s = self.settings
            call = CallPlan(steps, s.frames, s.height, s.width, s.guidance)
            stage = f"calibrating {' and '.join(m.label for m in self.methods if m.prepare)} ({steps} steps)"
            self._prepared[steps] = prepare_stack(self.pipe, self.configs, call, lambda: self._untimed(stage, steps))
        return self._prepared[steps]

    def _untimed(self, stage: str, steps: int) -> None:
        """A plain pipeline call at the request's settings (latents only), e.g. for a calibration."""
        self.stop_if_cancelled()
        self.stage = stage
        self.total += steps
        self.pipe(**self._kwargs(stage, None, steps, decode=False))

    def warm_up(self, side: str, decode: bool = False) -> None:
        """An untimed short call: denoiser only, or (once per pipeline and size) the whole pipeline."""
        self.stop_if_cancelled()
        self.stage = f"the {side} {'pipeline warm-up' if decode else 'warm-up'}"
        label = "warming up the pipeline (text encoder and decoder)" if decode else f"warm-up · {side}"
        with self._applied(side, self.warmup_steps), self._watch("warm-ups"):
            self.pipe(**self._kwargs(label, None, self.warmup_steps, decode))

    def timed(self, side: str, round_number: int, decode: bool,
              steps: int) -> tuple[TimedCall, VideoRun | None, tuple[MethodReport, ...] | None]:
        self.stop_if_cancelled()  # before the call's text encoding: no step would check for a while
        self.stage = f"the {side} run (round {round_number})"
        if decode:
            gc.collect()  # garbage left by earlier calls must not count toward this video's memory peak
        device = self.engine.device
        with self._applied(side, steps) as applied:
            started = time.time()
            with self._watch("timed"), MemoryMonitor(device) as monitor:
                output, timing = timed_call(self.pipe, device=device, **self._kwargs(side, round_number, steps, decode))
            reports = None if applied is None else self._reports(applied)
        self.stop_if_cancelled()  # a decode has no step to stop at
        call = TimedCall(side, round_number, decode, timing, monitor.report, started)
        if not decode:
            return call, None, reports
        frames = np.asarray(output.frames[0])
        nonfinite = check_finite(frames, side)
        if nonfinite == 0:
            self.announce(f"temporal consistency of the {side} video (optical flow)")
        temporal = temporal_consistency(frames) if nonfinite == 0 else None
        return call, VideoRun(frames, monitor.report, temporal, nonfinite, started), reports

    def metered(self, side: str, steps: int) -> Metered:
        """An untimed call whose tensor memory is counted (a CPU has no exact allocator peak): the
        weights the pipeline holds with the side's stack applied, the peak of the denoising loop
        (from the denoiser's first call to the last step's end: text encoding before it is not
        counted there) and over the whole call."""
        self.stop_if_cancelled()
        self.stage = f"counting the {side} side's memory"
        with self._applied(side, steps):
            weights = pipeline_weight_bytes(self.pipe)  # as held: float8 copies, not the originals kept on the host
            with TensorMemoryMeter() as meter, meter.section_before(TEXT_ENCODING, denoisers_of(self.pipe)):
                self.pipe(**self._kwargs(f"memory · {side}", None, steps, decode=True,
                                         at_last_step=lambda: meter.mark(DENOISING)))
        return Metered(weights, meter.peaks.get(DENOISING, meter.peak_bytes), meter.peak_bytes)

    # -- helpers

    def _reports(self, applied: AppliedStack) -> tuple[MethodReport, ...]:
        """Every method's report in the stack's order: the accelerated side's and the modifiers'."""
        side, modifiers = iter(applied.reports()), iter(self._modifiers.reports() if self._modifiers else ())
        return tuple(next(modifiers) if shared and self._modifiers else next(side) for shared in self.shared)

    @contextlib.contextmanager
    def _applied(self, side: str, steps: int) -> Iterator[AppliedStack | None]:
        """The stack applied for the duration of the block on the accelerated side only (its
        modifiers, applied around both sides, excepted)."""
        configs = [c for c, shared in zip(self.configs_for(steps), self.shared) if not (shared and self._modifiers)]
        applied = AppliedStack(self.pipe, configs) if side == ACCELERATED else None
        try:
            yield applied
        finally:
            if applied is not None:
                applied.remove()

    def _kwargs(self, stage: str, round_number: int | None, steps: int, decode: bool,
                at_last_step: Callable[[], None] | None = None) -> dict[str, Any]:
        rounds = self.settings.rounds

        def on_step_end(pipe, step_index, timestep, callback_kwargs):
            if at_last_step is not None and step_index + 1 == steps:
                at_last_step()
            now = time.time()
            if step_index > 0:
                self.last_step_s = now - self.last_step_end
            self.last_step_end = now
            self.stop_if_cancelled()
            self.done += 1
            if self.progress is not None:
                self.progress(ProgressEvent(stage, round_number, rounds, step_index + 1, steps, self.done,
                                            self.total, decoding=decode and step_index + 1 == steps))
            return callback_kwargs

        call = self.settings.call_kwargs(self.parameters) | {"num_inference_steps": steps}
        # A CPU generator: the same seed gives the same initial noise on every device.
        return call | dict(
            generator=torch.Generator("cpu").manual_seed(self.settings.seed),
            output_type="np" if decode else "latent",
            callback_on_step_end=on_step_end,
        )


def device_memory_bytes(device: torch.device) -> int:
    """What a request may use: a GPU's total memory, or the host's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    return psutil.virtual_memory().total


def check_fits(preset: ModelPreset, settings: ResolvedSettings, device: torch.device, pipe: Any = None,
               source: str | None = None) -> None:
    """Refuse up front a request that cannot fit this device even with every memory method (the
    plan's floor, :meth:`vdtome.engine.plan.Sizer.least_possible`), naming the numbers; ``pipe``:
    the loaded pipeline (a built-in model is sized from it, before any call)."""
    if preset.requires_gpu and device.type != "cuda":
        return  # the loader refuses it, naming the GPU it needs
    try:
        sizer = sizer_for(preset.name, settings.frames, settings.height, settings.width, pipe, source)
        need = sizer.least_possible()
    except (RequestError, TypeError, ValueError, RuntimeError, NotImplementedError):
        return  # a preset the plan cannot size is not refused on its account
    have = device_memory_bytes(device)
    if need > have:
        where = "this GPU has" if device.type == "cuda" else "this machine has"
        raise RequestError(
            f"{preset.label} at {settings.frames} frames, {settings.height}x{settings.width} needs at least "
            f"{need / 2**30:.1f} GB even with every memory method (activation slicing, VAE tiling, fp8 weights, "
            f"group offloading) and {where} {have / 2**30:.1f} GB; choose fewer frames or a smaller size "
            "(`python -m vdtome plan` shows the estimate by phase)", "frames")


@dataclass(frozen=True)
class Metered:
    """One side's metered call (bytes): weights held, tensor peak in the denoising loop and overall."""

    weights_bytes: int
    denoising_bytes: int
    peak_bytes: int


def _plan_check(settings: ResolvedSettings, configs: tuple[Any, ...], metered: dict[str, Metered],
                timing: Any, pipe: Any, source: str | None = None) -> PlanCheck | None:
    """The memory plan's estimate of both sides next to their measured peaks: on a CPU the weights
    held plus the metered call's tensor peak, on a GPU the decoding call's peak CUDA allocation
    (weights included). A pipeline its loader offloads is estimated offloaded on both sides. None
    where the plan cannot size this preset."""
    loaded = (Offload(mode="model"),) if already_offloaded(pipe) else ()
    try:
        sizer = sizer_for(settings.preset, settings.frames, settings.height, settings.width, source=source)
        baseline, accelerated = sizer.estimate(loaded), sizer.estimate(tuple(configs) + loaded)
    except (RequestError, TypeError, ValueError, RuntimeError, NotImplementedError):
        return None
    if len(metered) == 2:
        return PlanCheck(baseline, accelerated, metered[BASELINE].weights_bytes + metered[BASELINE].peak_bytes,
                         metered[ACCELERATED].weights_bytes + metered[ACCELERATED].peak_bytes,
                         "weights held + peak tensor memory of an untimed call")
    whole = next((f for f in (timing.memory if timing is not None else ()) if f.scope == "whole call" and f.exact), None)
    if whole is None:
        return PlanCheck(baseline, accelerated, None, None, "not measured")
    return PlanCheck(baseline, accelerated, int(whole.baseline), int(whole.accelerated),
                     "peak CUDA allocated of the decoding call (weights included)")


def _allocation_message(error: BaseException, session: _Session) -> str:
    """What ran out, where, at which size, and what the preset needs (no tensors kept)."""
    s, preset = session.settings, session.preset
    first_line = (str(error).splitlines() or [type(error).__name__])[0][:200]
    kind = "out of memory" if isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in \
        first_line.lower() else "a memory allocation failed"
    need = ""
    if preset.gpu_memory_gb is not None:
        need = (f"; {preset.label} needs about {preset.gpu_memory_gb:g} GB of GPU memory at its defaults "
                f"({preset.num_frames} frames, {preset.height}x{preset.width})")
    device = session.engine.device
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        need += f"; this GPU has {total:.0f} GB"
    return (
        f"{kind} during {session.stage} at {s.frames} frames, {s.height}x{s.width}, {s.steps} steps{need}. "
        f"Try fewer frames or a smaller size. ({first_line})"
    )




_default_engine: ComparisonEngine | None = None
_default_settings: dict[str, Any] = {}
_default_lock = threading.Lock()


def default_engine(**settings: Any) -> ComparisonEngine:
    """The process's one engine (loaded pipelines, cached baselines), shared by the library's
    :func:`compare` and the app. ``settings`` (``ComparisonEngine`` arguments) configure it
    on first use; asking again with other settings is an error rather than a second engine."""
    global _default_engine, _default_settings
    with _default_lock:
        if _default_engine is None:
            _default_engine, _default_settings = ComparisonEngine(**settings), settings
        elif settings and settings != _default_settings:
            raise RuntimeError(f"the default engine was already created with {_default_settings}; got {settings}")
        return _default_engine


def compare(request: ComparisonRequest | str, prompt: str | None = None, *, out_dir: str | Path | None = None,
            progress: Progress | None = None, cancel: Any = None, write: bool = True,
            **settings: Any) -> ComparisonResult:
    """One comparison with the process-wide engine (its pipeline and baseline caches are shared).

    ``compare("tiny-shapes-128", "a red circle moving right slowly on a white background",
    methods=(ToMeConfig(ratio=0.3),))`` or ``compare(ComparisonRequest(...))``; ``settings`` are
    :class:`ComparisonRequest`'s fields. Bad requests raise :class:`RequestError`."""
    if isinstance(request, ComparisonRequest):
        if prompt is not None or settings:
            raise TypeError("give either a ComparisonRequest or a preset name with its settings, not both")
    else:
        request = ComparisonRequest(preset=request, prompt="" if prompt is None else prompt, **settings)
    return default_engine().run(request, out_dir=out_dir, progress=progress, cancel=cancel, write=write)
