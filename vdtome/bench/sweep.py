"""Sweep files: the settings a benchmark runs, as stacks of method settings with grids expanded.

A sweep file (YAML) names its settings by the methods' own form fields, so any registered method
and any of its fields can be swept without code here knowing them::

    name: smoke
    description: two merge ratios, a cache, and the pair
    request: {steps: 4, rounds: 3}          # optional: applies to every comparison
    stacks:
      - tome: {ratio: [0.25, 0.5]}          # a list is a grid axis: two settings
      - first_block_cache: {threshold: 0.2}
      - tome: {ratio: 0.5}                  # several methods in one entry stack, in this order
        first_block_cache: {threshold: [0.1, 0.2]}
      - tome:                               # a list of grids: their union (fields that go together)
          - {ratio: [0.3, 0.5], stride_t: 1, stride_y: 3, stride_x: 3}
          - {ratio: [0.3, 0.5], stride_t: 2, stride_y: 3, stride_x: 3}

Fields may be named without their method's prefix (``threshold``); a list-valued field takes its
items joined by ``+`` (``targets: self-attention+feed-forward``), as on the command line. Top-level
keys starting with ``x-`` are ignored (a place for YAML anchors shared by several grids). Every
value is checked by its field's rules; an error names the file, the entry and the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vdtome.core.presets import DATA_DIR
from vdtome.core.validation import RequestError
from vdtome.methods import check_stack, config_fields, field_owner, method_named, method_of, stack_label

SWEEPS_DIR = DATA_DIR / "presets" / "sweeps"
# The request fields a sweep file may fix for all its comparisons (ComparisonRequest's names).
REQUEST_FIELDS = ("frames", "height", "width", "steps", "guidance", "rounds", "warmup_steps")
MAX_SETTINGS = 1000


@dataclass(frozen=True)
class Setting:
    """One point of a sweep: the stack it runs and the field values the sweep file gave it.
    ``name``: how tables and plots call it (the stack's label, plus the values that tell it apart
    from another setting with the same label)."""

    configs: tuple[Any, ...]
    values: tuple[tuple[str, Any], ...]  # (form field name, value) in file order
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or stack_label(self.configs)

    @property
    def key(self) -> str:
        """Identifies the stack by every config field (two stacks with one label, e.g. differing
        only in a field the label leaves out, get different keys)."""
        return _digest([{"method": method_of(c).name, "config": config_fields(c)} for c in self.configs])

    def value(self, field_name: str) -> Any:
        return dict(self.values).get(field_name)


@dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    settings: tuple[Setting, ...]
    request: tuple[tuple[str, Any], ...] = ()  # fixed request fields, e.g. (("steps", 4),)

    @property
    def swept(self) -> tuple[str, ...]:
        """Fields that take more than one value across the settings, in first-seen order."""
        seen: dict[str, set[str]] = {}
        for setting in self.settings:
            for name, value in setting.values:
                seen.setdefault(name, set()).add(json.dumps(value, default=str))
        return tuple(name for name, values in seen.items() if len(values) > 1)

    @property
    def axes(self) -> tuple[tuple[str, ...], ...]:
        """The swept fields as plot axes. Fields where one's value determines the other's (a
        stride's t, y and x written as three variants) form one axis: one real choice of the sweep."""
        def column(name: str) -> list[str]:
            return [json.dumps(setting.value(name), default=str) for setting in self.settings]

        axes: list[list[str]] = []
        for name in self.swept:
            for axis in axes:
                first, other = column(axis[0]), column(name)
                if len(set(zip(first, other))) == max(len(set(first)), len(set(other))):
                    axis.append(name)
                    break
            else:
                axes.append([name])
        return tuple(tuple(axis) for axis in axes)

    def axis_value(self, setting: Setting, axis: tuple[str, ...]) -> Any:
        """A setting's value on an axis (None where it has none); one field's value, or joined by "/"."""
        values = [setting.value(name) for name in axis]
        if all(value is None for value in values):
            return None
        return values[0] if len(values) == 1 else "/".join(str(value) for value in values)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shipped_sweeps() -> dict[str, Path]:
    """The sweep files shipped under ``vdtome/data/presets/sweeps``, by name (file name without ``.yaml``)."""
    return {path.stem: path for path in sorted(SWEEPS_DIR.glob("*.yaml"))}


def load_sweep(source: str | Path) -> Sweep:
    """A sweep from a file path or a shipped sweep's name (``smoke``)."""
    path = Path(source)
    if not path.suffix and str(source) in shipped_sweeps():
        path = shipped_sweeps()[str(source)]
    if not path.is_file():
        raise RequestError(f"no sweep file {str(source)!r}; shipped sweeps: {', '.join(shipped_sweeps())}", "sweep")
    return parse_sweep(path.read_text(encoding="utf-8"), origin=path.name, default_name=path.stem)


def parse_sweep(text: str, origin: str = "sweep", default_name: str = "sweep") -> Sweep:
    """A sweep from YAML text; errors name ``origin``, the entry and the field."""
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise RequestError(f"{origin} is not valid YAML: {error}", "sweep") from None
    if not isinstance(document, Mapping):
        raise RequestError(f"{origin} must be a mapping with a 'stacks' list", "sweep")
    unknown = sorted(key for key in set(document) - {"name", "description", "request", "stacks"}
                     if not str(key).startswith("x-"))
    if unknown:
        raise RequestError(f"{origin}: unknown key {unknown[0]!r} (keys: name, description, request, stacks; "
                           "x-... for YAML anchors)", "sweep")
    request = document.get("request") or {}
    if not isinstance(request, Mapping) or set(request) - set(REQUEST_FIELDS):
        bad = sorted(set(request) - set(REQUEST_FIELDS)) if isinstance(request, Mapping) else [request]
        raise RequestError(f"{origin}: request takes {', '.join(REQUEST_FIELDS)}; got {bad[0]!r}", "sweep")
    stacks = document.get("stacks")
    if not isinstance(stacks, list) or not stacks:
        raise RequestError(f"{origin}: 'stacks' must be a non-empty list of stacks", "sweep")
    settings: dict[str, Setting] = {}
    for number, entry in enumerate(stacks, 1):
        where = f"{origin}, stack {number}"
        for setting in _expand_stack(entry, where):
            if setting.key in settings:
                raise RequestError(f"{where}: {setting.label} gives the same configuration as an earlier setting "
                                   f"({_values_text(settings[setting.key].values)} and "
                                   f"{_values_text(setting.values)}): a value that changes nothing here, or a "
                                   "setting listed twice", "sweep")
            settings[setting.key] = setting
            if len(settings) > MAX_SETTINGS:
                raise RequestError(f"{origin} expands to more than {MAX_SETTINGS} settings", "sweep")
    return Sweep(
        name=str(document.get("name") or default_name),
        description=str(document.get("description") or ""),
        settings=_named(tuple(settings.values())),
        request=tuple((key, request[key]) for key in REQUEST_FIELDS if key in request),
    )


def _values_text(values: tuple[tuple[str, Any], ...]) -> str:
    return ", ".join(f"{name} {value}" for name, value in values) or "the defaults"


def _named(settings: tuple[Setting, ...]) -> tuple[Setting, ...]:
    """Settings whose stack labels coincide (the label leaves some fields out, e.g. ``matching``)
    are named with the values that tell them apart."""
    by_label: dict[str, list[Setting]] = {}
    for setting in settings:
        by_label.setdefault(setting.label, []).append(setting)
    named = []
    for setting in settings:
        twins = by_label[setting.label]
        if len(twins) > 1:
            names = {name for twin in twins for name, _ in twin.values}
            differing = [(name, value) for name, value in setting.values
                         if len({json.dumps(twin.value(name), default=str) for twin in twins}) > 1 and name in names]
            setting = dataclasses.replace(setting, name=f"{setting.label} ({_values_text(tuple(differing))})")
        named.append(setting)
    return tuple(named)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the plain loader keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # the mapping's own keys (a merged anchor's keys may be overridden)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key_node.value!r} is given twice in one mapping (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


@contextlib.contextmanager
def _located(where: str) -> Iterator[None]:
    """A field's refusal inside the sweep, prefixed with where it stands ("mine.yaml, stack 2, tome")."""
    try:
        yield
    except RequestError as error:
        raise RequestError(f"{where}: {error}", "sweep") from None


def _expand_stack(entry: Any, where: str) -> list[Setting]:
    """Every setting of one stack entry: the product over its methods of each method's grid points."""
    if not isinstance(entry, Mapping) or not entry:
        raise RequestError(f"{where} must map method names to their fields, e.g. {{tome: {{ratio: 0.5}}}}", "sweep")
    per_method = []
    for name, grids in entry.items():
        with _located(where):
            method = method_named(name)
        if grids is None:
            grids = {}
        grids = grids if isinstance(grids, list) else [grids]
        points = []
        for grid in grids:
            if not isinstance(grid, Mapping):
                raise RequestError(f"{where}, {name}: fields must be a mapping (field: value or [values]), got "
                                   f"{grid!r}", "sweep")
            with _located(f"{where}, {name}"):
                points += _grid_points(method, grid)
        per_method.append(points)
    settings = []
    for combination in itertools.product(*per_method):
        configs = tuple(config for config, _ in combination)
        with _located(where):
            check_stack(configs)
        settings.append(Setting(configs, tuple(item for _, values in combination for item in values)))
    return settings


def _grid_points(method, grid: Mapping[str, Any]) -> list[tuple[Any, tuple[tuple[str, Any], ...]]]:
    """(config, values) for every point of one method's grid; every value checked by its field."""
    axes = []
    for key, given in grid.items():
        form_field = method.field_named(str(key))
        values = given if isinstance(given, list) else [given]
        if not values:
            raise RequestError(f"{key} has an empty list of values", "sweep")
        axes.append((form_field, values))
    points = []
    for combination in itertools.product(*(values for _, values in axes)):
        overrides: dict[str, Any] = {}
        shown: list[tuple[str, Any]] = []
        for (form_field, _), value in zip(axes, combination):
            checked = form_field.from_text(value) if isinstance(value, str) else form_field.parse(value)
            overrides[form_field.name] = checked
            shown.append((form_field.name, list(checked) if isinstance(checked, tuple) else checked))
        points.append((method.config_from(overrides), tuple(shown)))
    return points


def field_label(name: str) -> str:
    """A swept field's label for plots and tables ("Merge ratio"), found in the registry."""
    owner = field_owner(name)
    return name if owner is None else owner[1].label


def axis_label(axis: tuple[str, ...]) -> str:
    """"Merge ratio", or "Stride t / Stride y / Stride x" for fields that change together."""
    return " / ".join(field_label(name) for name in axis)


__all__ = ["Setting", "Sweep", "axis_label", "field_label", "load_sweep", "parse_sweep", "shipped_sweeps"]
