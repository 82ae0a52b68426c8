"""Where a tune's comparisons run: one :class:`TrialWorker` (an engine holding the loaded pipeline
and its baselines) in the tuner's process (:class:`LocalTrials`), or one per device as Ray actors
(:class:`RayTrials`, ``--ray-address``). The study stays with the tuner (:mod:`vdtome.bench.tune`):
workers get a stack's form values and send back figures, so the same trial gives the same figures
wherever it ran."""

from __future__ import annotations

import math
import os
import socket
import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vdtome.bench.tune_plan import PromptFigures, Quality, TunePlan, judged
from vdtome.core.validation import RequestError

Stack = Sequence[tuple[str, dict[str, Any]]]  # (method, form values) in stack order


class ValidationFailed(RuntimeError):
    """A finalist's validation comparison failed to run (a NaN video, a dead worker): the tune stops
    there; its trials and the validation comparisons made so far are kept (``--resume``)."""


@dataclass(frozen=True)
class TrialRun:
    """What a trial's stack did on the tuning prompts: the paired one-round ratios, the quality,
    the methods that did nothing (every evidence count 0), and whether it stopped early under a
    floor. ``error``: it failed to run (a NaN video, a dead worker); ``refused``: a rule checked as
    the stack was applied refused it (it never ran); ``worker``: the host and process that ran it."""

    speedups: tuple[float, ...] = ()
    quality: Quality | None = None
    idle_methods: tuple[str, ...] = ()
    stopped_early: bool = False
    seconds: float = 0.0
    error: str | None = None
    refused: str | None = None
    worker: str = ""  # where it ran: host:pid

    @property
    def speedup(self) -> float:
        """The geometric mean of the prompts' ratios."""
        return math.exp(statistics.fmean(math.log(s) for s in self.speedups))


class TrialWorker:
    """Runs a tune's trials and validation comparisons with one engine. ``threads``: torch's CPU
    threads (a Ray worker starts with one)."""

    def __init__(self, plan: TunePlan, device: str | None = None, threads: int | None = None,
                 engine: Any = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.plan = plan
        self._engine = engine
        self._device = device
        self._baseline_kept: dict[str, bool] = {}

    @property
    def engine(self):
        if self._engine is None:
            from vdtome.engine.engine import ComparisonEngine

            self._engine = ComparisonEngine(device=self._device)
        return self._engine

    def environment(self) -> dict[str, Any]:
        """Where this worker's comparisons run (its machine, device, library versions)."""
        from vdtome.measure.environment import environment

        return environment(self.engine.device)

    def trial(self, stack: Stack, cancel: Any = None) -> TrialRun:
        """The stack on the tuning prompts, one timing round each; it stops after a prompt that
        left it under a floor (no later prompt can lift it)."""
        configs = _configs(stack)
        started = time.perf_counter()
        speeds, psnr, ssim, kept, base = [], [], [], [], []
        idle: set[str] = set()
        prompts = self.plan.tuning()
        stopped = False
        for index, prompt in enumerate(prompts):
            try:
                result = self._compare(prompt, configs, rounds=1, cancel=cancel)
            except RequestError as error:  # a cross-method rule, checked as the stack is applied
                return TrialRun(refused=str(error), seconds=time.perf_counter() - started, worker=_here())
            if not result.ok or result.fidelity is None or result.speedup("denoising") is None:
                return TrialRun(error=result.error or "no fidelity or timing", seconds=time.perf_counter() - started,
                                worker=_here())
            idle |= {m.label for m in result.methods if m.report.evidence and not m.report.acted}
            speeds.append(result.speedup("denoising").value)
            psnr.append(result.fidelity.psnr_mean)
            ssim.append(result.fidelity.ssim_mean)
            if judged(self.plan.model()):
                kept.append(self._kept(prompt, result.accelerated.frames))
                base.append(self._baseline_judged(prompt, result))
            quality = Quality(tuple(psnr), tuple(ssim), tuple(kept), tuple(base))
            if any(floor.broken(quality) for floor in self.plan.floors) and index + 1 < len(prompts):
                stopped = True
                break
        return TrialRun(tuple(speeds), quality, tuple(sorted(idle)), stopped, time.perf_counter() - started,
                        worker=_here())

    def validate(self, stack: Stack, prompt: str, cancel: Any = None) -> PromptFigures:
        """The stack on one validation prompt with the full protocol (the plan's rounds)."""
        result = self._compare(prompt, _configs(stack), self.plan.rounds, cancel=cancel)
        if not result.ok:
            raise ValidationFailed(f"validating on {prompt!r} failed: {result.error}")
        ratio = result.speedup("denoising")
        e2e = result.speedup("end_to_end")
        kept = base = None
        if judged(self.plan.model()):
            kept = self._kept(prompt, result.accelerated.frames)
            base = self._baseline_judged(prompt, result)
        busy = bool(result.timing is not None and result.timing.busy_warning)
        return PromptFigures(prompt, ratio.value, ratio.low, ratio.high, ratio.verdict.value,
                             None if e2e is None else e2e.value, result.fidelity.psnr_mean, result.fidelity.ssim_mean,
                             kept, base, busy)

    def _compare(self, prompt: str, configs: tuple[Any, ...], rounds: int | None, cancel: Any):
        return self.engine.run(self.plan.request(prompt, configs, rounds), write=False, cancel=cancel)

    def _kept(self, prompt: str, frames) -> bool:
        from vdtome.core.frames import to_uint8
        from vdtome.offline import shapes

        verdict = shapes.judge(to_uint8(frames), shapes.Scene.from_prompt(prompt))
        return verdict.colour_right and verdict.direction_right

    def _baseline_judged(self, prompt: str, result) -> bool:
        if prompt not in self._baseline_kept:
            self._baseline_kept[prompt] = self._kept(prompt, result.baseline.frames)
        return self._baseline_kept[prompt]


def _here() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _configs(stack: Stack) -> tuple[Any, ...]:
    from vdtome.methods.registry import METHODS

    return tuple(METHODS[name].from_form(values) for name, values in stack)


class LocalTrials:
    """Trials run one at a time in this process; ``cancel`` (anything with ``is_set()``) is checked
    at every denoising step."""

    size = 1
    description = "this process"

    def __init__(self, worker: TrialWorker, cancel: Any = None) -> None:
        self.worker = worker
        self.cancel = cancel
        self._queue: deque[tuple[int, Stack]] = deque()

    def environment(self) -> dict[str, Any]:
        return self.worker.environment()

    def submit(self, number: int, stack: Stack) -> None:
        self._queue.append((number, stack))

    def next_finished(self) -> tuple[int, TrialRun]:
        number, stack = self._queue.popleft()
        return number, self.worker.trial(stack, self.cancel)

    def validate(self, stack: Stack, prompt: str) -> PromptFigures:
        return self.worker.validate(stack, prompt, self.cancel)

    def shutdown(self) -> None:
        self._queue.clear()


class RayTrials:
    """Trials on Ray actors, one per device, as many at once as there are actors; the validation
    comparisons run one after another on the first actor (a finalist's prompts stop at its first
    one under a floor). The actors are started as the benchmark's are
    (:func:`vdtome.bench.ray_runner.start_actors`)."""

    def __init__(self, plan: TunePlan, address: str | None = None, workers: int | None = None,
                 cpus_per_worker: float | None = None, device: str | None = None,
                 init: dict[str, Any] | None = None) -> None:
        from vdtome.bench.ray_runner import start_actors

        self.actors, self.description = start_actors(TrialWorker, {"plan": plan}, address=address, workers=workers,
                                                     cpus_per_worker=cpus_per_worker, device=device, init=init)
        self.size = len(self.actors)
        self._idle = list(self.actors)
        self._running: dict[Any, tuple[int, Any]] = {}

    def environment(self) -> dict[str, Any]:
        import ray

        return ray.get(self.actors[0].environment.remote())

    def submit(self, number: int, stack: Stack) -> None:
        actor = self._idle.pop()
        self._running[actor.trial.remote(list(stack))] = (number, actor)

    def next_finished(self) -> tuple[int, TrialRun]:
        import ray

        from vdtome.bench.ray_runner import ray_error_text

        ready, _ = ray.wait(list(self._running), num_returns=1)
        number, actor = self._running.pop(ready[0])
        self._idle.append(actor)
        try:
            return number, ray.get(ready[0])
        except ray.exceptions.RayError as error:  # the worker raised, or died (Ray restarts it)
            return number, TrialRun(error=ray_error_text(error))

    def validate(self, stack: Stack, prompt: str) -> PromptFigures:
        import ray

        from vdtome.bench.ray_runner import ray_error_text

        try:
            return ray.get(self.actors[0].validate.remote(list(stack), prompt))
        except ray.exceptions.RayError as error:  # it raised ValidationFailed, or its actor died
            raise ValidationFailed(ray_error_text(error)) from None

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors, self._idle, self._running = [], [], {}
