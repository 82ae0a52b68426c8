"""One denoising-step context per pipeline, shared by every step-aware method applied to it.

The scheduler is the authority on steps: the pipeline calls ``scheduler.set_timesteps`` once at
the start of a generation (a new run) and ``scheduler.step`` once at the end of every denoising
step; every denoiser call in between is one branch of the step (0 = the first call, e.g. the
conditional one, 1 = the next, e.g. unconditional). Counting those calls needs no device value,
so the context adds no host synchronisation on CUDA. The run's timesteps are copied to the host
once, when the scheduler sets them, so :meth:`StepContext.current_timestep` answers with a Python
number: a method comparing it with a range (diffusers' attention caches do) waits for no device.

A bare model (no pipeline, no scheduler) has nothing to count with: there the context falls back
to the timestep's value (one host read per call): a new value is a new step, a turn back (to the
run's first value, or against the direction of travel) a new run.

Patches are reversible: the scheduler's two methods are shadowed by instance attributes and the
denoisers get torch forward pre-hooks; the last :meth:`release` removes all of them.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from vdtome.core.denoisers import named_denoisers

ATTRIBUTE = "_vdtome_step_context"


@dataclass
class StepState:
    run: int = 0  # generations since the context was attached
    step: int = -1  # denoising step of the current run (0-based)
    call_in_step: int = -1  # 0 for a step's first denoiser call (e.g. cond), 1 for the next (uncond), ...
    call_index: int = -1  # denoiser calls since the run began
    timestep: Any = None  # what the latest denoiser call received, by reference (never read here)


class StepContext:
    """Where a pipeline (or a bare denoiser) is in its denoising loop. Get it with :meth:`acquire`."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.state = StepState()
        self.users = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._scheduler = getattr(owner, "scheduler", None) if not isinstance(owner, torch.nn.Module) else None
        self.timesteps: list[float] = []  # the current run's, on the host
        # Fallback (bare model) bookkeeping.
        self._first_value: float | None = None
        self._last_value: float | None = None
        self._direction = 0

    def current_timestep(self) -> float | None:
        """The current step's timestep as a Python number (None before a run has started)."""
        if self._scheduler is None:
            return self._last_value  # a bare model: the value its latest call received
        step = self.state.step
        return self.timesteps[step] if 0 <= step < len(self.timesteps) else None

    @classmethod
    def of(cls, owner: Any) -> "StepContext":
        """The context already attached to ``owner`` (a method that acquired it passes it on)."""
        context = getattr(owner, ATTRIBUTE, None)
        if context is None:
            raise RuntimeError(f"vdtome: no step context is attached to {type(owner).__name__}")
        return context

    @classmethod
    def acquire(cls, owner: Any) -> "StepContext":
        """The context of ``owner`` (a pipeline or a bare denoiser), attached on first use."""
        context = getattr(owner, ATTRIBUTE, None)
        if context is None:
            context = cls(owner)
            context._attach()
            setattr(owner, ATTRIBUTE, context)
        context.users += 1
        return context

    def release(self) -> None:
        """One user less; the last one removes every patch."""
        self.users -= 1
        if self.users > 0:
            return
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._scheduler is not None:
            for name in ("set_timesteps", "step"):
                self._scheduler.__dict__.pop(name, None)
        if getattr(self.owner, ATTRIBUTE, None) is self:
            delattr(self.owner, ATTRIBUTE)

    def new_run(self) -> None:
        self.state = StepState(run=self.state.run + 1, step=0)
        self._first_value = self._last_value = None
        self._direction = 0

    # -- wiring

    def _attach(self) -> None:
        for _, module in named_denoisers(self.owner):
            self._handles.append(module.register_forward_pre_hook(self._on_denoiser_call, with_kwargs=True))
        scheduler = self._scheduler
        if scheduler is None:
            return
        set_timesteps, step = scheduler.set_timesteps, scheduler.step

        # functools.wraps keeps the signatures: pipelines inspect them (whether ``step`` takes a
        # generator or ``set_timesteps`` custom timesteps); a bare (*args, **kwargs) would silently
        # drop the generator and make a seeded run random.
        @functools.wraps(set_timesteps)
        def on_set_timesteps(*args, **kwargs):
            self.new_run()
            output = set_timesteps(*args, **kwargs)
            self.timesteps = [float(t) for t in torch.as_tensor(scheduler.timesteps).detach().cpu().tolist()]
            return output

        @functools.wraps(step)
        def on_step(*args, **kwargs):
            output = step(*args, **kwargs)
            self.state.step += 1
            self.state.call_in_step = -1
            return output

        scheduler.set_timesteps, scheduler.step = on_set_timesteps, on_step

    @torch.compiler.disable
    def _on_denoiser_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = _timestep_argument(module, args, kwargs)
        state = self.state
        if self._scheduler is None:
            self._advance_by_value(timestep)
            state = self.state
        else:
            if state.step < 0:  # called outside a scheduler-driven loop (e.g. a test calling the pipe's model)
                state.step = 0
            state.call_in_step += 1
        state.call_index += 1
        state.timestep = timestep

    def _advance_by_value(self, timestep: Any) -> None:
        """Bare-model fallback: a new timestep value is a new step; a turn back starts a new run."""
        if timestep is None:
            value = None
        elif isinstance(timestep, torch.Tensor):
            value = float(timestep.detach().max())
        else:
            value = float(timestep)
        state, last = self.state, self._last_value
        if value is not None and last is not None and value != last:
            direction = 1 if value > last else -1
            if value == self._first_value or (self._direction and direction != self._direction):
                self.new_run()
                self.state.step = -1
                state, last = self.state, None
            else:
                self._direction = direction
        if value is None or last is None or value != last:
            state.step += 1
            state.call_in_step = 0
            if self._first_value is None:
                self._first_value = value
        else:
            state.call_in_step += 1
        self._last_value = value


def _timestep_argument(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    if "timestep" in kwargs:
        return kwargs["timestep"]
    signature = _signature(type(module))
    try:
        return signature.bind_partial(module, *args).arguments.get("timestep")
    except TypeError:
        return None


@functools.lru_cache(maxsize=None)
def _signature(model_class: type) -> inspect.Signature:
    return inspect.signature(model_class.forward)
