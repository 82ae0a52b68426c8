"""The method seam: what an acceleration method provides and the typed report it returns.

A method is a frozen config dataclass, ``apply(pipe, config) -> Applied`` (``reset`` after a
warm-up, ``remove`` undoes exactly, ``report`` returns a :class:`MethodReport`) and its form fields,
declared without Gradio. Nothing above this seam reads a method's own field names.

A method's declaration (config, form, docs, availability) imports no diffusers, so listing the
methods (``python -m vdtome methods``, ``--help``) does not wait seconds for it: hooks that need
diffusers live in a runtime module that the declaration names with :class:`Deferred`.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from vdtome.core.phases import DENOISING
from vdtome.core.validation import (PLAIN_DECIMAL, RequestError, all_refused, boolean, choice, choices, finite_number,
                                    plain_text, whole_number)

if TYPE_CHECKING:  # an annotation only: the declaration imports no torch
    from vdtome.core.denoisers import DenoiserType

FieldKind = Literal["number", "integer", "boolean", "choice", "choices", "text"]

# What a method carries from one denoising step to the next (``Method.reuses_across_steps``); the
# stacking rules of :mod:`vdtome.methods.stack` read it.
REUSES_ATTENTION = "attention outputs"
REUSES_BLOCKS = "block residuals"


@dataclass(frozen=True)
class FormField:
    """One input of a method's form. ``name`` is the request / API parameter name, unique across
    every registered method; ``sweepable`` numeric fields can be swept by the app and the CLI.
    ``bound``: for a field whose largest valid value depends on other fields (their names in
    ``bound_by``), that value from the form's values, with the rule in words (the form's slider
    follows it; the method's parse enforces it). ``counts_steps``: a count of denoising steps
    (the first steps computed whole...): a tune draws it below the steps of the calls it tunes."""

    name: str
    kind: FieldKind
    default: Any
    label: str
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    options: tuple[str, ...] = ()
    sweepable: bool = False
    advanced: bool = False  # shown folded ("more options")
    sweep_example: str = ""  # values a sweep over this field starts from (default: spread over its range)
    bound: Callable[[Mapping[str, Any]], tuple[float, str]] | None = None
    bound_by: tuple[str, ...] = ()
    counts_steps: bool = False  # a number of denoising steps: a tune draws it below the request's steps

    def sweep_suggestion(self) -> str:
        """Four values to sweep this field over, as the form's sweep box offers them."""
        if self.sweep_example:
            return self.sweep_example
        low, high = self.minimum, self.maximum
        if self.kind == "integer":
            return ", ".join(str(v) for v in range(int(low), min(int(low) + 4, int(high) + 1)))
        return ", ".join(f"{low + (high - low) * share:g}" for share in (0.05, 0.1, 0.2, 0.4))

    def parse(self, value: Any) -> Any:
        """``value`` as the client sent it, checked against this field's type and range."""
        what = self.label[:1].lower() + self.label[1:]  # "stride t", "MagCache threshold"
        if self.kind == "integer":
            return whole_number(what, value, int(self.minimum), int(self.maximum), self.name)
        if self.kind == "number":
            return finite_number(what, value, self.minimum, self.maximum, self.name)
        if self.kind == "boolean":
            return boolean(what, value, self.name)
        if self.kind == "choice":
            return choice(what, value, self.options, self.name)
        if self.kind == "text":
            return plain_text(what, value, self.name)
        return choices(what, value, self.options, self.name)

    def from_text(self, value: str) -> Any:
        """A value typed on a command line ("0.5", "true", "self-attention+feed-forward"), then
        checked as :meth:`parse` does."""
        if self.kind == "integer" and re.fullmatch(r"-?[0-9]+", value):
            return self.parse(int(value))
        if self.kind == "number" and PLAIN_DECIMAL.fullmatch(value):
            return self.parse(float(value))
        if self.kind == "boolean" and value in ("true", "false"):
            return value == "true"
        if self.kind == "choices":
            return self.parse([item for item in value.split("+") if item])
        return self.parse(value)

    def typed(self, value: Any) -> str:
        """``value`` as it is typed on the command line: ``true``, ``0.5``, ``self-attention+feed-forward``,
        ``""`` (empty text)."""
        if value == "":
            return '""'
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, (list, tuple)):
            return "+".join(str(item) for item in value)
        return str(value)

    def describe(self, default: Any = None) -> str:
        """One line for ``python -m vdtome methods``: name, default (``default``: another to show, such
        as a preset's; None: the field's own), rule and label."""
        if self.kind in ("number", "integer"):
            rule = f"{self.minimum:g}..{self.maximum:g}"
        elif self.kind == "boolean":
            rule = "true|false"
        elif self.kind == "choice":
            rule = "one of " + "|".join(self.options)
        elif self.kind == "text":
            rule = "text" + (", e.g. " + "|".join(self.options) if self.options else "")
        else:
            rule = "any of " + "|".join(self.options) + ", joined by +"
        sweep = ", sweepable" if self.sweepable else ""
        return f"{self.name} = {self.typed(self.default if default is None else default)}  ({rule}{sweep}) {self.label}"


@dataclass(frozen=True)
class Evidence:
    """A count that proves the method acted, e.g. 1800 of 3600 block computations skipped."""

    label: str
    count: int
    of: int | None = None

    def text(self) -> str:
        """The count without its label: "1800 of 3600 (50%)"."""
        if self.of:
            return f"{self.count} of {self.of} ({self.count / self.of:.0%})"
        return str(self.count)


@dataclass(frozen=True)
class MethodReport:
    """What a method did in the latest run.

    ``summary``: short columns for history rows, sweeps and plots (``{"ratio": 0.5}``);
    ``rows``: metric-table rows (metric, value, note); ``detail``: JSON-safe figures for
    ``result.json``; ``evidence``: counts that prove it acted (all zero: it did nothing);
    ``phases``: the phases of a call it acted in (:mod:`vdtome.core.phases`): the timing claims a
    change there only, and shows the other phases as a noise check.
    """

    method: str
    summary: Mapping[str, Any] = field(default_factory=dict)
    rows: tuple[tuple[str, str, str], ...] = ()
    notes: tuple[str, ...] = ()
    detail: Mapping[str, Any] = field(default_factory=dict)
    evidence: tuple[Evidence, ...] = ()
    phases: frozenset[str] = frozenset({DENOISING})

    @property
    def acted(self) -> bool:
        return any(item.count > 0 for item in self.evidence)

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": dict(self.summary),
            "evidence": [dataclasses.asdict(item) for item in self.evidence],
            "notes": list(self.notes),
            "detail": dict(self.detail),
            "phases": sorted(self.phases),
        }


@dataclass(frozen=True)
class CallPlan:
    """The pipeline calls a stack is about to be applied around: what a method's ``prepare`` may
    depend on (a calibration is only valid for the settings it was made at)."""

    steps: int
    frames: int
    height: int
    width: int
    guidance: float

    def describe(self) -> str:
        return f"{self.steps} steps, {self.frames} frames, {self.height}x{self.width}, guidance {self.guidance:g}"


class Applied(Protocol):
    # Forget statistics and step state, e.g. after a warm-up, for a caller that keeps a stack applied
    # across generations (the engine applies a fresh stack around every call instead).
    def reset(self) -> None: ...

    def remove(self) -> None: ...  # undo exactly

    def report(self) -> MethodReport: ...


@dataclass(frozen=True)
class Deferred:
    """``module.name``, imported at the first call and called with its arguments: how a method's
    declaration names its ``apply`` or search when they live in a runtime module that imports
    diffusers (a string, not an import, so declaring the method loads neither)."""

    module: str
    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)


@dataclass(frozen=True)
class Search:
    """How ``python -m vdtome search`` tunes a method per layer: ``start(pipe, config)`` attaches a
    probe the calibration calls run through (``remove()`` detaches it; ``choose(threshold)`` gives
    the schedule's entries, the per-layer list under ``key``); ``field``: the form field that loads
    the schedule back."""

    field: str
    key: str
    start: Callable[[Any, Any], Any]


@dataclass(frozen=True)
class Method:
    """A registered acceleration method.

    ``parse``: form values by field name -> config (raises :class:`RequestError` naming the
    field; the generic type and range checks have run already). ``unavailable``: why it cannot
    serve these denoiser types (None if it can; see :class:`vdtome.core.denoisers.DenoiserType`):
    asked of a preset before its weights load, from a table without importing diffusers.
    ``steps_alike``: every denoising step of the config costs the same (the timing protocol may
    then time short rounds of a few steps, compared by their mean step). ``reuses_across_steps``: what it carries from one
    step to the next ("attention outputs", "block residuals", ...; None: nothing), and
    ``matching_varies``: whether its token layout changes between steps: the stacking rules of
    :mod:`vdtome.methods.stack` read these two. ``diffusers_cache``: a diffusers cache hook
    (diffusers keeps one per model). ``needs_guidance``: works only on a classifier-free-guidance
    batch (guidance above 1), refused otherwise. ``prepare(pipe, config, call, run_untimed)``: for a method
    whose config depends on the calls (their step count, a calibration), returns the config to
    apply around calls of that :class:`CallPlan`; ``run_untimed()`` runs the plain pipeline once
    with it (untimed, latents only), e.g. to calibrate. The engine calls it before applying the stack.
    """

    name: str
    label: str
    config_type: type
    apply: Callable[[Any, Any], Applied]
    fields: tuple[FormField, ...]
    parse: Callable[[Mapping[str, Any]], Any]
    summary: Callable[[Any], str]
    unavailable: Callable[[tuple[DenoiserType, ...]], str | None] = lambda denoiser_types: None
    on_by_default: bool = False
    steps_alike: Callable[[Any], bool] = lambda config: False
    reuses_across_steps: str | None = None
    matching_varies: Callable[[Any], bool] = lambda config: False
    diffusers_cache: bool = False
    needs_guidance: bool = False
    prepare: Callable[[Any, Any, CallPlan, Callable[[], None]], Any] | None = None
    # Moves the weights as the methods before it leave them (offloading copies them to the host as
    # they are when it is applied): it must come last in a stack.
    applies_last: bool = False
    # Changes what a call holds in memory (its purpose, or a side effect worth showing): on a CPU the
    # engine then counts both sides' tensor memory in extra untimed calls, and shows the memory plan.
    changes_memory: bool = False
    search: Search | None = None  # a per-layer schedule search (``python -m vdtome search``)
    # Decides what to skip from how the residual of the first n transformer blocks changes between
    # steps (cache-dit's Fn): a method that changes those blocks would make every step look new.
    measures_first_blocks: Callable[[Any], int] | None = None
    # Whether the config changes what transformer block i computes (token merging in it).
    alters_block: Callable[[Any, int], bool] | None = None
    # Skips work by wrapping the denoiser's whole forward (cache-dit): no other step cache may stack.
    wraps_denoiser: bool = False
    # Whether the config is a stack modifier applied around the baseline's calls too (torch.compile
    # with its baseline compiled): the verdict is then over the modified baseline.
    both_sides: Callable[[Any], bool] = lambda config: False
    # Its first calls compile: before timing, the engine runs both sides until nothing new compiles.
    settles: bool = False
    # Whether the config refuses a stack whose methods break a compiled graph (fullgraph).
    refuses_graph_breaks: Callable[[Any], bool] | None = None
    # Why the method breaks a compiled denoiser's graph, as measured (empty: it compiles into it).
    graph_breaks: str = ""
    docs: str = ""

    @property
    def enable_field(self) -> str:
        """The form's on/off switch for this method."""
        return f"use_{self.name}"

    def form_defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in self.fields}

    def from_form(self, values: Mapping[str, Any]) -> Any:
        """The config from form values (missing ones take their defaults), every value checked: a
        refusal names each field out of its type or range at once, then the rules across fields."""
        checked, errors = {}, []
        for form_field in self.fields:
            try:
                checked[form_field.name] = form_field.parse(values.get(form_field.name, form_field.default))
            except RequestError as error:
                errors.append(error)
        if errors:
            raise all_refused(errors)
        return self.parse(checked)

    def field_named(self, key: str) -> FormField:
        """A field by its form name or without this method's prefix (``threshold`` for
        ``first_block_cache_threshold``), as the command line and sweep files name them."""
        for form_field in self.fields:
            if key in (form_field.name, form_field.name.removeprefix(f"{self.name}_")):
                return form_field
        short = ", ".join(f.name.removeprefix(f"{self.name}_") for f in self.fields)
        raise RequestError(f"{self.name} has no field {key!r}; its fields: {short}", key)

    def config_from(self, overrides: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> Any:
        """The config from ``field=value`` overrides by form field name (the CLI's ``--method``) on
        top of ``defaults`` (a preset's, see :func:`vdtome.methods.preset_form_defaults`; None: the method's own)."""
        known = {f.name for f in self.fields}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise RequestError(f"{self.name} has no field {unknown[0]!r}; its fields: {', '.join(sorted(known))}",
                               unknown[0])
        return self.from_form({**(self.form_defaults() if defaults is None else defaults), **overrides})


def config_fields(config: Any) -> dict[str, Any]:
    """A config's fields, JSON-safe (tuples as lists)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(config).items()}
