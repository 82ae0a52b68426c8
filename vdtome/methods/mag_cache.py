"""MagCache as a plug-in: diffusers' ``MagCacheConfig`` hooks, calibrated here, not re-implemented.

MagCache skips the transformer blocks of a step (adding the last residual instead) while the
accumulated error predicted from the magnitude ratios of successive residuals stays below a
threshold. The ratios depend on the checkpoint and the step count, so ``prepare`` records them
once per (denoiser, step count) with one untimed plain run in diffusers' calibration mode, and
fills them into the config (hidden fields, not on the form).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import torch

from vdtome.core.denoisers import denoisers_of
from vdtome.core.diffusers_compat import hook_registry, mag_cache_block_hook_name
from vdtome.methods.base import REUSES_BLOCKS, CallPlan, MethodReport
from vdtome.methods.diffusers_cache import AppliedCache, block_cache_unavailable, cache_method
from vdtome.methods.schema import check_settings, config_values, form_fields, setting

NAME = "mag_cache"
MAX_SKIP_STEPS = 10
# denoiser -> {the calls calibrated for: (its ratios, one per step it served; when)}; weak: a
# pipeline's models may go.
CALIBRATIONS: WeakKeyDictionary[torch.nn.Module, dict[CallPlan, tuple[tuple[float, ...], float]]] = \
    WeakKeyDictionary()


@dataclass(frozen=True)
class MagCache:
    """``threshold``: the accumulated error budget below which a step's blocks are skipped;
    ``max_skip_steps``: most steps skipped in a row; ``retention_ratio``: share of the first steps
    always computed. Filled in by ``prepare``: ``num_inference_steps`` (the calibrated step count)
    and ``mag_ratios`` (one row per denoiser, in the pipeline's order). Defaults are diffusers'."""

    threshold: float = setting(0.06, "Error threshold", "skip a step's blocks while the error predicted from the "
                               "calibrated magnitude ratios stays below this (0: never skip)", 0.0, 1.0, 0.01,
                               sweepable=True)
    max_skip_steps: int = setting(3, "Most steps skipped in a row", "", 1, MAX_SKIP_STEPS, 1)
    retention_ratio: float = setting(0.2, "Steps always computed first", "share of the first steps never skipped "
                                     "(1: never skip)", 0.0, 1.0, 0.05, advanced=True)
    num_inference_steps: int | None = None
    mag_ratios: tuple[tuple[float, ...], ...] | None = None
    calibrated_on: str | None = None  # the calls' settings and when, for the report

    def __post_init__(self) -> None:
        check_settings(self, NAME)
        if (self.num_inference_steps is None) != (self.mag_ratios is None):
            raise ValueError("num_inference_steps and mag_ratios are calibrated together: set both or neither")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}")
        if self.mag_ratios is not None and not all(
                isinstance(row, tuple) and len(row) <= self.num_inference_steps
                and all(isinstance(r, float) and math.isfinite(r) and r >= 0 for r in row)
                for row in self.mag_ratios):
            raise ValueError("mag_ratios must hold one tuple of finite non-negative floats per denoiser, "
                             "at most one per step")


FIELDS = form_fields(MagCache, NAME)


def parse(values: Mapping[str, Any]) -> MagCache:
    return MagCache(**config_values(MagCache, NAME, values))


def summary(config: MagCache) -> str:
    return f"threshold {config.threshold:g} max skip {config.max_skip_steps}"


def build(config: MagCache, pipe: Any, model: torch.nn.Module) -> Any:
    from diffusers.hooks import MagCacheConfig

    # A denoiser that serves no step at this count (a Wan 2.2 expert at 1 step) gets a neutral ratio.
    ratios = config.mag_ratios[denoisers_of(pipe).index(model)] or (1.0,)
    return MagCacheConfig(threshold=config.threshold, max_skip_steps=config.max_skip_steps,
                          retention_ratio=config.retention_ratio, num_inference_steps=len(ratios),
                          mag_ratios=list(ratios))


class AppliedMagCache(AppliedCache):
    """The calibrated cache; its report says which calibration it used."""

    def __init__(self, pipe: Any, config: MagCache) -> None:
        if config.mag_ratios is None:
            raise ValueError("vdtome: mag_cache needs magnitude ratios calibrated for the call's step count; "
                             "the engine records them with METHOD.prepare before applying it")
        if len(config.mag_ratios) != len(denoisers_of(pipe)):
            raise ValueError(f"vdtome: mag_cache: {len(config.mag_ratios)} rows of ratios for "
                             f"{len(denoisers_of(pipe))} denoisers")
        super().__init__(pipe, config, NAME, build, summary)

    def report(self) -> MethodReport:
        report = super().report()
        calibration = {"num_inference_steps": self.config.num_inference_steps,
                       "mag_ratios": [list(row) for row in self.config.mag_ratios],
                       "calibrated_on": self.config.calibrated_on,
                       "how": "one untimed run of the plain pipeline with diffusers' MagCache in calibration mode"}
        return dataclasses.replace(
            report, detail={**report.detail, "calibration": calibration},
            notes=(*report.notes, f"MagCache's magnitude ratios come from one untimed calibration run of this "
                                  f"pipeline at {self.config.calibrated_on}; requests at those settings reuse it "
                                  "(whatever their prompt and seed)"))


def prepare(pipe: Any, config: MagCache, call: CallPlan, run_untimed: Callable[[], None]) -> MagCache:
    """``config`` with every denoiser's ratios for these calls, calibrating once per settings."""
    models = denoisers_of(pipe)
    if any(call not in CALIBRATIONS.get(model, {}) for model in models):
        calibrate(pipe, call, run_untimed)
    made = min(CALIBRATIONS[model][call][1] for model in models)
    return dataclasses.replace(config, num_inference_steps=call.steps,
                               mag_ratios=tuple(CALIBRATIONS[model][call][0] for model in models),
                               calibrated_on=f"{call.describe()} (made at {time.strftime('%H:%M:%S', time.localtime(made))})")


def calibrate(pipe: Any, call: CallPlan, run_untimed: Callable[[], None]) -> None:
    """One run with diffusers' MagCache in calibration mode (it never skips). Each denoiser's
    ratios are read from the hook's state after every call of its last block, since diffusers
    clears them when the run ends; a denoiser called in several cache contexts (one per CFG
    branch) gets their mean, as diffusers applies one list to every context."""
    from diffusers.hooks import MagCacheConfig

    # A step count above any call count: at that count diffusers would print and clear the ratios.
    def calibration(config: MagCache, pipe: Any, model: torch.nn.Module) -> Any:
        return MagCacheConfig(calibrate=True, num_inference_steps=call.steps + 1)

    applied = AppliedCache(pipe, MagCache(), NAME, calibration, summary)
    recorded: dict[torch.nn.Module, dict[str, tuple[float, ...]]] = {model: {} for model in applied.models}
    handles = []
    try:
        for model in applied.models:
            tail, hook = _tail_hook(model)
            handles.append(tail.register_forward_hook(_recorder(hook, recorded[model])))
        run_untimed()
    finally:
        for handle in handles:
            handle.remove()
        applied.remove()
    for model, by_context in recorded.items():
        rows = list(by_context.values())
        ratios = tuple(sum(column) / len(column) for column in zip(*rows))
        CALIBRATIONS.setdefault(model, {})[call] = (ratios, time.time())


def _tail_hook(model: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    """The model's last block and diffusers' hook on it (the one that records the ratios)."""
    name = mag_cache_block_hook_name()
    for module in model.modules():
        registry = hook_registry(module)
        hook = None if registry is None else registry.get_hook(name)
        if hook is not None and hook.is_tail:
            return module, hook
    raise ValueError(f"vdtome: mag_cache: diffusers put no tail hook on {type(model).__name__}")


def _recorder(hook: Any, store: dict[str, tuple[float, ...]]) -> Callable[..., None]:
    """A forward hook keeping a copy of the ratios recorded so far, per cache context."""
    def record(module, args, output) -> None:
        manager = hook.state_manager
        store[manager.context.name] = tuple(float(r) for r in manager.get_state().calibration_ratios)
    return record


METHOD = cache_method(
    NAME, "MagCache", MagCache, FIELDS, parse, summary, build,
    reuses=REUSES_BLOCKS,
    unavailable=block_cache_unavailable,
    prepare=prepare,
    apply=AppliedMagCache,
    graph_breaks="diffusers' MagCache head and block hooks run eagerly (torch.compiler.disable)",
    docs="skips a step's blocks while the error predicted from calibrated residual magnitude ratios stays small "
         "(diffusers MagCacheConfig; calibrated by one untimed run per step count)",
)
