"""A method's config dataclass as its one schema: each setting declares its default, its form field
(label, help, range, step, choices) and so the rule its ``__post_init__`` checks, once.

    @dataclass(frozen=True)
    class FirstBlockCache:
        threshold: float = setting(0.05, "Residual threshold", "skip the other blocks while ...", 0.0, 1.0, 0.01,
                                   sweepable=True)

        def __post_init__(self) -> None:
            check_settings(self, "first_block_cache")

    FIELDS = form_fields(FirstBlockCache, "first_block_cache")

A setting's form name is ``<prefix>_<name>`` (``name`` defaults to the config field's: the API's
parameter names stay what they were when forms were written by hand). A pair such as a timestep
range is one config field shown as two form fields (``parts``), each with the same range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vdtome.core.validation import RequestError
from vdtome.methods.base import FormField

SCHEMA = "vdtome.setting"


@dataclass(frozen=True)
class Part:
    """One form field of a paired setting: its name suffix, label and help."""

    name: str
    label: str
    help: str = ""


@dataclass(frozen=True)
class Setting:
    label: str
    help: str
    minimum: float | None
    maximum: float | None
    step: float | None
    options: tuple[str, ...]
    sweepable: bool
    advanced: bool
    name: str | None
    parts: tuple[Part, ...]
    sweep_example: str
    free_text: bool
    counts_steps: bool


def setting(default: Any, label: str, help: str = "", minimum: float | None = None, maximum: float | None = None,
            step: float | None = None, *, options: tuple[str, ...] = (), sweepable: bool = False,
            advanced: bool = False, name: str | None = None, parts: tuple[Part, ...] = (),
            sweep_example: str = "", free_text: bool = False, counts_steps: bool = False) -> Any:
    """A config field that is also a form field (see the module's docstring). ``free_text``: a
    text field whose ``options`` are only suggestions; ``counts_steps``: a number of denoising steps."""
    if sweepable and (parts or not isinstance(default, (int, float)) or isinstance(default, bool)):
        raise TypeError(f"{label}: only a single number can be swept")
    spec = Setting(label, help, minimum, maximum, step, tuple(options), sweepable, advanced, name, tuple(parts),
                   sweep_example, free_text, counts_steps)
    return dataclasses.field(default=default, metadata={SCHEMA: spec})


def _settings(config_type: type) -> list[tuple[dataclasses.Field, Setting]]:
    return [(f, f.metadata[SCHEMA]) for f in dataclasses.fields(config_type) if SCHEMA in f.metadata]


def _form_name(prefix: str, config_field: dataclasses.Field, spec: Setting, part: Part | None = None) -> str:
    base = f"{prefix}_{spec.name or config_field.name}"
    return base if part is None else f"{base}_{part.name}"


def _kind(default: Any, spec: Setting) -> str:
    if isinstance(default, bool):
        return "boolean"
    if isinstance(default, int):
        return "integer"
    if isinstance(default, float):
        return "number"
    if spec.free_text and isinstance(default, str):
        return "text"
    if spec.options:
        return "choice"
    raise TypeError(f"a setting's default must be a bool, int, float or one of its options, got {default!r}")


def form_fields(config_type: type, prefix: str) -> tuple[FormField, ...]:
    """The form fields of ``config_type``'s settings, in declaration order."""
    out = []
    for config_field, spec in _settings(config_type):
        pieces = [(_form_name(prefix, config_field, spec, part), part.label, part.help, value)
                  for part, value in zip(spec.parts, config_field.default)] if spec.parts else [
            (_form_name(prefix, config_field, spec), spec.label, spec.help, config_field.default)]
        for name, label, help_text, default in pieces:
            out.append(FormField(name, _kind(default, spec), default, label, help_text, spec.minimum, spec.maximum,
                                 spec.step, spec.options, sweepable=spec.sweepable,
                                 advanced=spec.advanced, sweep_example=spec.sweep_example,
                                 counts_steps=spec.counts_steps))
    return tuple(out)


def config_values(config_type: type, prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The config's keyword arguments from checked form values (pairs joined again)."""
    kwargs = {}
    for config_field, spec in _settings(config_type):
        kwargs[config_field.name] = (tuple(values[_form_name(prefix, config_field, spec, part)] for part in spec.parts)
                                     if spec.parts else values[_form_name(prefix, config_field, spec)])
    return kwargs


def check_settings(config: Any, prefix: str) -> None:
    """Every setting of ``config`` (each part of a pair) against its form field's type and range: a
    :class:`RequestError` (a ValueError) naming the form field, so a config built in code obeys the
    rules the form shows, with the same message."""
    fields = iter(form_fields(type(config), prefix))
    for config_field, spec in _settings(type(config)):
        value = getattr(config, config_field.name)
        if spec.parts and isinstance(value, list):  # as result.json writes a pair
            value = tuple(value)
            object.__setattr__(config, config_field.name, value)
        if spec.parts and (not isinstance(value, tuple) or len(value) != len(spec.parts)):
            raise RequestError(f"{config_field.name} must be a pair (from, to), got {value!r}",
                               _form_name(prefix, config_field, spec, spec.parts[0]))
        for piece in (value if spec.parts else (value,)):
            next(fields).parse(piece)


def check_increasing(config: Any, prefix: str, name: str, what: str) -> None:
    """A paired setting's rule ``from < to``, naming its second form field."""
    low, high = getattr(config, name)
    config_field, spec = next(item for item in _settings(type(config)) if item[0].name == name)
    if low >= high:
        raise RequestError(f"the {what} timestep range is empty: {low} to {high}",
                           _form_name(prefix, config_field, spec, spec.parts[-1]))
