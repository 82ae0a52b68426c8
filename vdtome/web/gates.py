"""The app's request gates: a form's values -> what to run, every rule checked, or a
:class:`RequestError` naming the field. The same code runs when a request is submitted (Gradio's
validator, before it takes a queue place) and when it runs. No Gradio import: tested without a server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vdtome.bench.runner import FORM_FIELDS, BenchPlan, plan_from_form
from vdtome.core.denoisers import pipeline_denoiser_types
from vdtome.core.presets import ModelPreset
from vdtome.core.validation import RequestError, shown
from vdtome.engine.pipelines import (
    ALLOW_CUSTOM_MODEL_ENV,
    CustomModelRefused,
    custom_model_source,
    custom_models_allowed,
)
from vdtome.engine.request import ComparisonRequest, resolve
from vdtome.measure.protocol import MAX_GPU_SECONDS
from vdtome.methods import check_available, check_stack
from vdtome.web.gpu_budget import benchmark_seconds, comparison_estimate
from vdtome.web.limits import ServiceLimits
from vdtome.web.ui import CUSTOM_MODEL, stack_from_form, sweep_stacks

# The request's numeric fields: an empty box is refused here, every other rule by the engine.
NUMBERS = ("seed", "frames", "height", "width", "steps", "guidance", "rounds")


@dataclass(frozen=True)
class RequestGates:
    """The rules of this server: its presets, the operator's limits, whether it has a GPU and
    whether it runs on ZeroGPU (whose tasks have a GPU-time budget)."""

    presets: Mapping[str, ModelPreset]
    limits: ServiceLimits
    has_gpu: bool
    on_zero_gpu: bool = False

    def preset(self, name: Any, field: str) -> ModelPreset:
        if not isinstance(name, str) or name not in self.presets:
            raise RequestError(f"model preset must be one of {', '.join(self.presets)}, got {shown(name)}", field)
        preset = self.presets[name]
        if preset.requires_gpu and not self.has_gpu:
            raise RequestError(f"{preset.label} needs a GPU and this machine has none; pick a tiny preset", field)
        return preset

    def comparison(self, values: Mapping[str, Any], sweep: bool = False) -> tuple[list[ComparisonRequest], str | None]:
        """Requests (one, or one per value of the swept field for a sweep) and the custom-weights
        source, from the form's values exactly as the client sent them."""
        preset = self.preset(values["preset"], "preset")
        stack = stack_from_form(values)
        check_available(check_stack(stack), pipeline_denoiser_types(preset.pipeline_class))
        base = ComparisonRequest(
            preset=preset.name, prompt=values["prompt"], negative_prompt=values["negative_prompt"], methods=stack,
            snap=False,  # the page says what is wrong instead of silently running another size
            **{name: _number(values[name], name) for name in NUMBERS},
        )
        settings, _ = resolve(base, preset)  # every model rule, before the request is queued
        requests = [base]
        if sweep:
            requests = [dataclasses.replace(base, methods=point) for point in sweep_stacks(values)]
        if self.on_zero_gpu and preset.gpu_time is not None:
            estimate = comparison_estimate(requests)
            if not estimate.fits:
                parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in estimate.parts().items())
                raise RequestError(
                    f"this request needs about {estimate.total_s:.0f} s of GPU time ({parts}); a ZeroGPU task may "
                    f"take at most {MAX_GPU_SECONDS} s: lower the steps, frames, size, timing rounds or sweep points",
                    "steps",
                )
        self.limits.check_work(preset, settings, points=len(requests))
        return requests, self.custom_source(values[CUSTOM_MODEL])

    def benchmark(self, values: Mapping[str, Any]) -> BenchPlan:
        """The Benchmark form -> a plan. The size of the whole benchmark is checked first: it is
        cheap, the rest is per setting."""
        preset = self.preset(values["bench_preset"], "bench_preset")
        plan = plan_from_form(preset.name, values["bench_prompts"], values["bench_seeds"], values["bench_sweep"])
        rows = len(plan.groups()) * len(plan.sweep.settings)
        try:
            settings, _ = resolve(plan.request(plan.groups()[0], plan.sweep.settings[0]), preset)
        except RequestError as error:
            raise RequestError(f"{plan.sweep.name}: {error}", FORM_FIELDS.get(error.field, "bench_sweep")) from None
        try:
            self.limits.check_work(preset, settings, points=rows, points_name="benchmark rows")
        except RequestError as error:
            raise RequestError(f"{len(plan.prompts)} prompts x {len(plan.seeds)} seeds x {len(plan.sweep.settings)} "
                               f"settings = {rows} comparisons is more than this server takes at once ({error}) Use "
                               "fewer prompts, seeds or settings, or run it with `python -m vdtome bench`.",
                               "bench_prompts") from None
        try:
            plan.check()
        except RequestError as error:
            raise RequestError(str(error), FORM_FIELDS.get(error.field, "bench_sweep")) from None
        if self.on_zero_gpu and preset.gpu_time is not None:
            seconds = benchmark_seconds(plan)
            if seconds > MAX_GPU_SECONDS:
                raise RequestError(f"this benchmark needs about {seconds:.0f} s of GPU time; a ZeroGPU task may take "
                                   f"at most {MAX_GPU_SECONDS} s: fewer prompts, seeds or settings", "bench_prompts")
        return plan

    def tune(self, values: Mapping[str, Any]):
        """The Tune form -> a :class:`vdtome.bench.tune.TunePlan` at the preset's own settings: the
        floors (comma-separated), the methods, one that every stack holds (optional), the minutes
        of search (at most the operator's cap); its validation comparisons within the work limit."""
        from vdtome.bench.tune_plan import Floor, TunePlan

        preset = self.preset(values["tune_preset"], "tune_preset")
        if self.on_zero_gpu:
            raise RequestError("a tune runs comparisons for minutes and ZeroGPU lends a GPU for at most "
                               f"{MAX_GPU_SECONDS} s a task: run `python -m vdtome tune` on your own GPU",
                               "tune_preset")
        floors = values["tune_floors"]
        if not isinstance(floors, str) or not floors.strip():
            raise RequestError("give at least one floor, e.g. psnr=24 or judge", "tune_floors")
        methods = values["tune_methods"]
        if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
            raise RequestError(f"choose at least one method to tune, got {shown(methods)}", "tune_methods")
        minutes = values["tune_minutes"]
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) \
                or not 0 < minutes <= self.limits.tune_minutes:
            raise RequestError(f"minutes must be above 0 and at most {self.limits.tune_minutes} on this server (a "
                               f"longer tune: `python -m vdtome tune`), got {shown(minutes)}", "tune_minutes")
        require = values["tune_require"] or ""
        try:
            plan = TunePlan(preset=preset.name, floors=tuple(Floor.parse(t) for t in floors.split(",") if t.strip()),
                            methods=tuple(methods), minutes=float(minutes), tuning_prompts=2, validation_prompts=2,
                            finalists=2, require=(require,) if require else ())
        except RequestError as error:
            field = {"floor": "tune_floors", "methods": "tune_methods", "require": "tune_require"}
            raise RequestError(str(error), field.get(error.field, "tune_preset")) from None
        self.limits.check_work(preset, resolve(plan.request(plan.validation()[0], (), None), preset)[0],
                               points=plan.finalists * plan.validation_prompts, points_name="validation comparisons")
        return plan

    def custom_source(self, custom_model: Any) -> str | None:
        """The custom weights' source (a hub id or a folder under the operator's root), if allowed."""
        if custom_model is not None and not isinstance(custom_model, str):
            raise RequestError(f"custom weights must be text, got {shown(custom_model)}", CUSTOM_MODEL)
        if not (custom_model or "").strip():
            return None
        if not custom_models_allowed():
            raise RequestError(f"custom model ids are switched off; the operator can allow them with "
                               f"{ALLOW_CUSTOM_MODEL_ENV}=1", CUSTOM_MODEL)
        try:
            return custom_model_source(custom_model, self.limits.custom_model_root)
        except CustomModelRefused as error:
            raise RequestError(str(error), CUSTOM_MODEL) from None


def _number(value: Any, name: str) -> Any:
    """Empty boxes are refused here; every other rule is checked by the engine (never coerced)."""
    if value is None or value == "":
        raise RequestError(f"{name} is empty: enter a number", name)
    return value
