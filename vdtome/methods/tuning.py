"""What a tune searches (the tuner of issue 35 draws its trials here), read from the methods' own
form fields: which methods are on (the diffusers caches as one choice: diffusers keeps one per
model), and an on method's settings within the ranges, steps and choices its form and its API take.
A newly registered method is searchable with nothing changed here.

Light: no diffusers and no Optuna import. A trial is anything with Optuna's define-by-run
``suggest_int`` / ``suggest_float`` / ``suggest_categorical`` (``optuna.Trial`` is one), so a stack
is drawn in one pass, each value where the rules of the values before it allow it (a merge ratio
below its stride's cap).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from vdtome.core.denoisers import pipeline_denoiser_types
from vdtome.core.validation import RequestError
from vdtome.methods.base import FormField, Method
from vdtome.methods.registry import METHODS, preset_form_defaults
from vdtome.methods.stack import check_stack

#: Field kinds a trial draws; the rest (free text; a multiple choice) keep the preset's value, but for
#: a method's per-layer schedule field, drawn among the schedules searched on the preset.
SEARCHED_KINDS = ("integer", "number", "choice", "boolean")


class Trial(Protocol):
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1) -> int: ...

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None) -> float: ...

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any: ...


@dataclass(frozen=True)
class MethodSpace:
    """One method's part of the space: its on/off switch and the fields drawn when it is on."""

    method: Method
    fields: tuple[FormField, ...]

    @property
    def switch(self) -> str:
        return self.method.enable_field


#: The one choice among the step caches that never stack with one another (diffusers keeps one cache
#: per model; cache-dit wraps the whole denoiser): drawn as one categorical rather than switches the
#: rules would mostly refuse. Named when only diffusers' caches were in it: kept, so older studies resume.
CACHE_CHOICE = "diffusers_cache"
NO_CACHE = "none"


def exclusive_cache(method: Method) -> bool:
    """One of the step caches drawn as :data:`CACHE_CHOICE`."""
    return method.diffusers_cache or method.wraps_denoiser


@dataclass(frozen=True)
class Drawn:
    """One stack a trial drew: each on method's form values (every field, as a recipe and the
    form hold them) and its config, in the stack's order."""

    values: tuple[tuple[str, dict[str, Any]], ...]
    configs: tuple[Any, ...]


@dataclass(frozen=True)
class SearchSpace:
    """The stacks a tune may try on ``preset`` for calls of ``steps`` denoising steps, each drawn
    by :meth:`suggest`. ``schedules``: a schedule field's choices (per-layer schedules searched on
    this preset, and none)."""

    preset: Any
    methods: tuple[MethodSpace, ...]
    steps: int
    schedules: Mapping[str, tuple[str, ...]]
    required: frozenset[str] = frozenset()  # methods on in every stack drawn

    def suggest(self, trial: Trial) -> Drawn:
        """One stack, every method at the preset's defaults but for what the trial drew. A stack
        the stacking rules refuse raises :class:`RequestError` (naming the rule): it is never run;
        an empty stack is the baseline itself, refused too."""
        caches = [part.method.name for part in self.methods if exclusive_cache(part.method)]
        required_cache = [name for name in caches if name in self.required]
        choices = required_cache or [NO_CACHE, *caches]
        cache = trial.suggest_categorical(CACHE_CHOICE, choices) if caches else NO_CACHE
        drawn = []
        for part in self.methods:
            on = (part.method.name == cache if exclusive_cache(part.method)
                  else part.method.name in self.required or trial.suggest_categorical(part.switch, [False, True]))
            if not on:
                continue
            values = preset_form_defaults(part.method, self.preset)
            fixed: dict[str, Any] = {}  # what a drawn schedule was searched at: set by it, not drawn
            for form_field in part.fields:
                if form_field.name in self.schedules:
                    schedule = trial.suggest_categorical(form_field.name, ["", *self.schedules[form_field.name]])
                    values[form_field.name] = schedule
                    fixed = read_schedule_fields(part.method, schedule) if schedule else {}
                    values.update(fixed)
                elif form_field.name not in fixed:
                    values[form_field.name] = draw(trial, form_field, values, self.steps)
            drawn.append((part.method.name, values))
        if not drawn:
            raise RequestError("no method is on: that is the baseline, not a recipe", "methods")
        configs = tuple(METHODS[name].from_form(values) for name, values in drawn)
        check_stack(configs)
        return Drawn(tuple(drawn), configs)

    def field_names(self) -> list[str]:
        """The parameters a trial may draw (a required method's switch is none)."""
        return [name for part in self.methods for name in (
            *(() if part.method.name in self.required else (part.switch,)), *(f.name for f in part.fields))]

    def seeds(self) -> list[dict[str, Any]]:
        """Trials to start from, as parameters: the preset's default stack, each method alone at
        the preset's defaults, and each per-layer schedule searched on the preset (its method alone,
        at what the schedule was searched at and the preset's other defaults)."""
        out = []
        defaults = {part.method.name: {} for part in self.methods if part.method.on_by_default}
        if defaults:
            out.append(self._params(defaults))
        for part in self.methods:  # each method alone at the preset's defaults
            if {part.method.name} != set(defaults):
                out.append(self._params({part.method.name: {}}))
        for name, schedules in self.schedules.items():
            part = next(part for part in self.methods if any(f.name == name for f in part.fields))
            for schedule in schedules:
                settings = {name: schedule}
                settings.update(read_schedule_fields(part.method, schedule))
                out.append(self._params({part.method.name: settings}))
        return out

    def _params(self, on: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """A trial's parameters that switch on exactly the methods of ``on`` (and the required
        ones) at the preset's defaults, overridden by their given values."""
        on = {name: {} for name in self.required} | dict(on)
        params: dict[str, Any] = {}
        if any(exclusive_cache(part.method) for part in self.methods):
            params[CACHE_CHOICE] = next((n for n in on if exclusive_cache(METHODS[n])), NO_CACHE)
        for part in self.methods:
            if not exclusive_cache(part.method) and part.method.name not in self.required:
                params[part.switch] = part.method.name in on
            if part.method.name in on:
                values = preset_form_defaults(part.method, self.preset) | dict(on[part.method.name])
                params.update({f.name: values[f.name] for f in part.fields})
        return params


def read_schedule_fields(method: Method, schedule: str) -> dict[str, Any]:
    """The form values a shipped schedule was searched at, which it must be applied with (token
    merging's strides, tile sparsity's placement and dense first steps): each of the schedule's
    settings that names one of the method's fields (a stride names three)."""
    from vdtome.methods.schedules import read_schedule

    data = read_schedule(schedule, method.name, method.search.field, method.search.key)
    names = {f.name for f in method.fields}
    fixed = {}
    for key, value in data.items():
        if key == "stride" and isinstance(value, list) and {"stride_t", "stride_y", "stride_x"} <= names:
            fixed.update(zip(("stride_t", "stride_y", "stride_x"), value))
        elif key != method.search.key and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                fixed[method.field_named(key).name] = value
            except RequestError:
                continue  # a setting of the search (threshold, size), not of the method
    return fixed


def draw(trial: Trial, form_field: FormField, values: Mapping[str, Any], steps: int | None = None) -> Any:
    """One field's value: a whole number on its step grid, a number on its step grid (continuous
    without a step), one of its options or a boolean; below a bound the values drawn before set,
    and a count of steps below ``steps``."""
    name, kind = form_field.name, form_field.kind
    if kind == "boolean":
        return trial.suggest_categorical(name, [False, True])
    if kind == "choice":
        return trial.suggest_categorical(name, list(form_field.options))
    high = form_field.maximum
    if form_field.bound is not None:
        high = min(high, form_field.bound(values)[0])
    if form_field.counts_steps and steps is not None:
        high = max(form_field.minimum, min(high, steps - 1))
    if kind == "integer":
        step = int(form_field.step or 1)
        low = int(form_field.minimum)
        return trial.suggest_int(name, low, low + (int(high) - low) // step * step, step=step)
    step = form_field.step
    if step:  # the grid's last point at or below the high end (Optuna's rule for a stepped range)
        high = round(form_field.minimum + int((high - form_field.minimum) / step + 1e-9) * step, 10)
        return round(trial.suggest_float(name, form_field.minimum, high, step=step), 10)
    return trial.suggest_float(name, form_field.minimum, high)


def search_space(preset: Any, methods: Iterable[str] | None = None, steps: int | None = None,
                 required: Iterable[str] = ()) -> SearchSpace:
    """The space on ``preset``: ``methods`` by name (default: every registered method that can
    serve the preset's denoiser and changes speed rather than memory), each with its fields of a
    searched kind, for calls of ``steps`` steps (default: the preset's). A named method the preset
    cannot take is refused, saying why. ``required``: methods every stack holds (among ``methods``).
    A method that compiles (torch.compile) is a condition of the measurement, not a speed setting:
    never in the default set; named, every stack holds it at its defaults (the tune then finds the
    fastest stack over the compiled baseline)."""
    types = pipeline_denoiser_types(preset.pipeline_class)
    guided = preset.guidance_scale > 1.0
    if methods is None:
        chosen = [m for m in METHODS.values() if m.unavailable(types) is None and not m.changes_memory
                  and not m.settles and (guided or not m.needs_guidance)]
    else:
        chosen = []
        for name in methods:
            if name not in METHODS:
                raise RequestError(f"unknown method {name!r}; registered: {', '.join(METHODS)}", "methods")
            method = METHODS[name]
            reason = method.unavailable(types) or (
                None if guided or not method.needs_guidance else "it needs classifier-free guidance, which the "
                                                                "preset's default guidance does not use") or (
                "it changes memory, not speed: a tune searches for speed" if method.changes_memory else None)
            if reason:
                raise RequestError(f"{method.label} cannot be tuned on {preset.name}: {reason}", "methods")
            chosen.append(method)
    if not chosen:
        raise RequestError(f"no registered method can be tuned on {preset.name}", "methods")
    schedules = {method.search.field: preset_schedules(method, preset.name) for method in chosen
                 if method.search is not None and preset_schedules(method, preset.name)}
    parts = tuple(MethodSpace(method, () if method.settles else drawn_fields(method, schedules)) for method in chosen)
    required = frozenset(required) | {method.name for method in chosen if method.settles}
    missing = sorted(required - {m.name for m in chosen})
    if missing:
        raise RequestError(f"required method {missing[0]!r} is not among the methods tuned on {preset.name}: "
                           f"{', '.join(m.name for m in chosen)}", "require")
    if len([m for m in chosen if m.name in required and exclusive_cache(m)]) > 1:
        raise RequestError("these step caches never stack (diffusers keeps one cache per model; cache-dit wraps "
                           "the whole denoiser): require one of them at most", "require")
    return SearchSpace(preset, parts, preset.num_inference_steps if steps is None else steps, schedules, required)


def preset_schedules(method: Method, preset_name: str) -> tuple[str, ...]:
    """The shipped per-layer schedules of ``method`` searched on the preset (``python -m vdtome
    search``): a tune may draw them as that method's schedule, and starts from each."""
    from vdtome.methods.schedules import SHIPPED, shipped_schedules

    found = []
    for name in shipped_schedules(method.name):
        try:
            made_on = json.loads((SHIPPED / f"{name}.{method.name}.json").read_text()).get("preset")
        except (OSError, ValueError):
            continue
        if made_on == preset_name:
            found.append(name)
    return tuple(found)


def bounded(form_field: FormField) -> bool:
    """A number has a range to draw from (one without keeps the preset's value)."""
    return form_field.kind not in ("integer", "number") or (
        form_field.minimum is not None and form_field.maximum is not None)


def drawn_fields(method: Method, schedules: Mapping[str, tuple[str, ...]] = {}) -> tuple[FormField, ...]:
    """The fields a trial draws, a bounded field after those that bound it (the merge ratio after
    the strides that set its cap); a per-layer schedule's field where the preset has ``schedules``."""
    searched = [f for f in method.fields if (f.kind in SEARCHED_KINDS and bounded(f)) or f.name in schedules]
    # A schedule first (it sets what it was searched at), a bounded field after what bounds it.
    return tuple(sorted(searched, key=lambda f: (f.name not in schedules, bool(f.bound_by))))
