"""The registry of acceleration methods: name -> :class:`Method`, config type -> :class:`Method`."""

from __future__ import annotations

import dataclasses
from typing import Any

from vdtome.core.validation import RequestError
from vdtome.methods.base import FormField, Method

METHODS: dict[str, Method] = {}
# Names the request, the app's form and the command line use themselves: a method's field may not
# take one (its generated --FIELD flag and its API parameter would clash with theirs).
RESERVED_NAMES = frozenset({
    "preset", "prompt", "negative_prompt", "seed", "frames", "height", "width", "steps", "guidance", "rounds",
    "timing_steps", "warmup_steps", "snap", "methods", "method", "custom_model", "ratios", "sweep_field",
    "history", "device", "out", "json", "no_snap", "no_baseline_cache",
})


def register(method: Method) -> Method:
    """Add a method; names (its own and its form fields') must be new, so no form field clashes."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is registered already")
    taken = {f.name for m in METHODS.values() for f in m.fields} | {m.enable_field for m in METHODS.values()}
    for name in (method.enable_field, *(f.name for f in method.fields)):
        if name in RESERVED_NAMES:
            raise ValueError(f"{method.name}: form field {name!r} is a name the request or the app uses itself")
        if name in taken:
            raise ValueError(f"{method.name}: form field {name!r} is taken by another method")
    if any(m.config_type is method.config_type for m in METHODS.values()):
        raise ValueError(f"{method.config_type.__name__} is registered already")
    METHODS[method.name] = method
    return method


def method_named(name: Any) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise RequestError(f"unknown method {name!r}; registered methods: {', '.join(METHODS)}", "method")
    return METHODS[name]


def method_of(config: Any) -> Method:
    for method in METHODS.values():
        if type(config) is method.config_type:
            return method
    known = ", ".join(m.config_type.__name__ for m in METHODS.values())
    raise RequestError(f"unknown acceleration config {type(config).__name__}; known: {known}")


def field_owner(name: Any) -> tuple[Method, FormField] | None:
    """The method and form field named ``name`` (form field names are unique across methods)."""
    for method in METHODS.values():
        for form_field in method.fields:
            if form_field.name == name:
                return method, form_field
    return None


def preset_form_defaults(method: Method, preset: Any) -> dict[str, Any]:
    """``method``'s form defaults on ``preset``: its own, overlaid with the preset's
    ``method_defaults`` (fields named with or without the method's prefix), each value checked by
    its field. A preset whose value breaks a field's rule fails here, naming both."""
    values = method.form_defaults()
    for key, value in getattr(preset, "method_defaults", {}).get(method.name, {}).items():
        try:
            form_field = method.field_named(key)
            values[form_field.name] = form_field.parse(list(value) if isinstance(value, (list, tuple)) else value)
        except RequestError as error:
            raise ValueError(f"preset {preset.name!r}: method_defaults.{method.name}.{key}: {error}") from None
    return values


def default_stack(preset: Any) -> tuple[Any, ...]:
    """The stack a request that names none runs: the methods on by default, at ``preset``'s defaults."""
    return tuple(method.from_form(preset_form_defaults(method, preset))
                 for method in METHODS.values() if method.on_by_default)


def method_overrides(text: str) -> tuple[Method, dict[str, Any]]:
    """``NAME[:field=value,...]`` -> (the method, its form fields given), each value checked alone.
    A field may be named without its method's prefix; a list takes ``+`` between its items."""
    name, _, settings = text.partition(":")
    method = method_named(name.strip())
    overrides: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in settings.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise RequestError(f"{method.name}: {item!r} is not field=value", "method")
        add_override(method, overrides, key.strip(), value.strip())
    return method, overrides


def add_override(method: Method, overrides: dict[str, Any], key: str, value: str) -> None:
    """Check ``value`` (text) by ``method``'s form field ``key`` and add it to ``overrides``."""
    try:
        form_field = method.field_named(key)
        if form_field.name in overrides:
            raise RequestError(f"{key} is given twice", form_field.name)
        overrides[form_field.name] = form_field.from_text(value)
    except RequestError as error:
        raise RequestError(f"{method.name}: {error}", error.field, error.fields) from None


def config_from_overrides(method: Method, overrides: dict[str, Any], preset: Any = None) -> Any:
    """``method``'s config: ``overrides`` on top of ``preset``'s defaults (the method's own without
    one), every cross-field rule checked. Errors name the method, however the fields were given."""
    try:
        return method.config_from(overrides, None if preset is None else preset_form_defaults(method, preset))
    except RequestError as error:
        raise RequestError(f"{method.name}: {error}", error.field, error.fields) from None


def method_spec(config: Any) -> str:
    """The ``NAME[:field=value,...]`` text :func:`parse_method_spec` reads back as ``config``: its
    fields that differ from their defaults (configs of plain fields: numbers, booleans, choices)."""
    changed = []
    for config_field in dataclasses.fields(config):
        value = getattr(config, config_field.name)
        if value == config_field.default:
            continue
        if not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"{config_field.name}={value!r} has no one-word form")
        changed.append(f"{config_field.name}={str(value).lower() if isinstance(value, bool) else value}")
    name = method_of(config).name
    return f"{name}:{','.join(changed)}" if changed else name


def parse_method_spec(text: str, preset: Any = None) -> Any:
    """``NAME[:field=value,...]`` -> that method's config (``tome:ratio=0.5,stride_y=1``,
    ``first_block_cache:threshold=0.05``); fields not given at ``preset``'s defaults."""
    method, overrides = method_overrides(text)
    return config_from_overrides(method, overrides, preset)
