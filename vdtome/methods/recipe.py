"""A recipe: the stack a tune chose (``python -m vdtome tune``), with the settings it was tuned at and
the figures that chose it, in one JSON file that loads everywhere::

    stack = vdtome.apply(pipe, "recipe.json")   # or a shipped recipe's name: "tiny-shapes-128"
    video = pipe(prompt, **stack.recipe.call_settings()).frames[0]
    stack.remove()                               # the pipeline exactly as before

    python -m vdtome compare --recipe recipe.json --prompt "..."

Each method of the stack is kept as its form values (every field, by the names the app, the API and
``--method`` use), so a recipe is read by the same parsers as a request and a refused value names
its field. A recipe is refused when it was made for another preset (or pipeline), size, step count
or guidance, naming what differs: a speedup tuned at one size says nothing of another.

Light: no diffusers import until a recipe is applied or its call settings are asked for.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vdtome.core.validation import RequestError
from vdtome.methods.base import config_fields
from vdtome.methods.registry import METHODS

FORMAT = 1
KIND = "vdtome recipe"
SHIPPED = Path(__file__).resolve().parent.parent / "data" / "recipes"
#: The call settings a recipe is tuned at, in the request's names: a run at other values is refused.
CALL_SETTINGS = ("frames", "height", "width", "steps", "guidance")


@dataclass(frozen=True)
class Recipe:
    """The stack (method name, its form values) and the call settings it was tuned at; what the
    tune measured (``tuning``: floors, prompts, trials; ``validation``: the chosen stack's figures
    on held-out prompts; ``front``: the Pareto front) rides along for people to read."""

    preset: str
    pipeline_class: str
    frames: int
    height: int
    width: int
    steps: int
    guidance: float
    stack: tuple[tuple[str, Mapping[str, Any]], ...]
    tuning: Mapping[str, Any] = field(default_factory=dict)
    validation: Mapping[str, Any] = field(default_factory=dict)
    front: tuple[Mapping[str, Any], ...] = ()
    environment: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""

    def configs(self) -> tuple[Any, ...]:
        """The stack's configs, each through its method's own form parser: a value the form would
        refuse is refused, naming ``stack[i].field``."""
        configs = []
        for index, (name, values) in enumerate(self.stack):
            where = f"stack[{index}]"
            if name not in METHODS:
                raise RequestError(f"recipe {where}: unknown method {name!r}; registered: {', '.join(METHODS)}",
                                   f"{where}.method")
            method = METHODS[name]
            unknown = sorted(set(values) - {f.name for f in method.fields})
            if unknown:
                raise RequestError(f"recipe {where}: {name} has no field {unknown[0]!r} (made by another vdtome?)",
                                   f"{where}.{unknown[0]}")
            try:
                configs.append(method.from_form(values))  # a field added since takes its default (the old behaviour)
            except RequestError as error:
                raise RequestError(f"recipe {where} ({name}): {error}", f"{where}.{error.field}") from None
        return tuple(configs)

    def call_settings(self) -> dict[str, Any]:
        """The pipeline call's size, steps and guidance it was tuned at (diffusers' argument names),
        and what else the comparison conditioned the call on (the preset's text length; LTX's frame
        rate): :func:`vdtome.core.presets.conditioning_kwargs`."""
        import inspect

        import diffusers

        from vdtome.core.presets import conditioning_kwargs, get_preset

        settings = {"num_frames": self.frames, "height": self.height, "width": self.width,
                    "num_inference_steps": self.steps, "guidance_scale": self.guidance}
        try:
            preset = get_preset(self.preset)
        except (KeyError, ValueError):  # a preset this installation does not ship
            return settings
        pipeline = getattr(diffusers, self.pipeline_class, None)
        parameters = () if pipeline is None else inspect.signature(pipeline.__call__).parameters
        return settings | conditioning_kwargs(preset.extras.get("max_sequence_length"), preset.fps, parameters)

    def check_settings(self, preset: str, **settings: Any) -> None:
        """Refuse a run on another preset or at other call settings (``frames=...``, ``steps=...``:
        None takes the recipe's), naming every setting that differs."""
        if preset != self.preset:
            raise RequestError(f"recipe {self.label()} was tuned on {self.preset}, not {preset}", "preset")
        differ = [name for name in CALL_SETTINGS
                  if settings.get(name) is not None and settings[name] != getattr(self, name)]
        if differ:
            listed = ", ".join(f"{name} {settings[name]:g} (tuned at {getattr(self, name):g})" for name in differ)
            raise RequestError(f"recipe {self.label()} was tuned at other settings: {listed}; run it at its own or "
                               "tune again", differ[0])

    def label(self) -> str:
        return self.name or f"for {self.preset}"

    def stack_text(self) -> str:
        from vdtome.methods.stack import stack_label

        return stack_label(self.configs())

    def figures_text(self) -> str:
        """What its validation measured, in one line ("" where it carries none): the speedup, the
        worst PSNR and, on a judged model, the clips whose prompt it kept."""
        figures = self.validation
        if not figures.get("speedup_median"):
            return ""
        prompts = len(figures.get("prompts", ())) or "its"
        parts = [f"{figures['speedup_median']:.2f}x denoising (median of {prompts} validation prompts)",
                 f"PSNR >= {figures['psnr_min']:.1f} dB"]
        if figures.get("judge_kept"):
            parts.append(f"prompt kept in {figures['judge_kept']}")
        return ", ".join(parts)

    def steps_alike(self) -> bool:
        """Every denoising step of its stack costs the same (:func:`vdtome.methods.stack.steps_alike`)."""
        from vdtome.methods.stack import steps_alike

        return steps_alike(self.configs())

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND, "format": FORMAT, "preset": self.preset, "pipeline_class": self.pipeline_class,
            **{name: getattr(self, name) for name in CALL_SETTINGS},
            "stack": [{"method": name, "fields": _json_safe(dict(values)),
                       "config": config_fields(config)} for (name, values), config in zip(self.stack, self.configs())],
            "tuning": dict(self.tuning), "validation": dict(self.validation), "front": list(self.front),
            "environment": dict(self.environment),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        return path


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


def shipped_recipes() -> tuple[str, ...]:
    return tuple(sorted(path.stem for path in SHIPPED.glob("*.json")))


def recipe_path(source: str | Path) -> Path:
    """A shipped recipe's file by name, else ``source`` as a path."""
    text = str(source)
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", text) and (SHIPPED / f"{text}.json").is_file():
        return SHIPPED / f"{text}.json"
    return Path(text).expanduser()


def load_recipe(source: str | Path | Mapping[str, Any] | Recipe) -> Recipe:
    """A recipe from a file, a shipped recipe's name, or its JSON as a mapping; a recipe that
    cannot be read, was edited out of shape or names what this vdtome does not know is refused,
    naming the field."""
    if isinstance(source, Recipe):
        return source
    name = ""
    if isinstance(source, Mapping):
        data = source
    else:
        path = recipe_path(source)
        name = path.stem if path.parent == SHIPPED else str(source)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            shipped = ", ".join(shipped_recipes()) or "none"
            raise RequestError(f"recipe {str(source)!r} is neither a shipped recipe ({shipped}) nor a file",
                               "recipe") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(f"recipe {str(source)!r} could not be read as JSON: {error}", "recipe") from None
    recipe = _from_dict(data, name)
    recipe.configs()  # every value checked now, not at the first call
    return recipe


def _from_dict(data: Any, name: str) -> Recipe:
    if not isinstance(data, Mapping) or data.get("kind") != KIND:
        raise RequestError("not a vdtome recipe (its \"kind\" is not \"vdtome recipe\")", "kind")
    if data.get("format") != FORMAT:
        raise RequestError(f"recipe format {data.get('format')!r} is not the format this vdtome reads ({FORMAT})",
                           "format")
    for key in ("preset", "pipeline_class"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise RequestError(f"recipe field {key!r} must be a non-empty text, got {data.get(key)!r}", key)
    for key in ("frames", "height", "width", "steps"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(f"recipe field {key!r} must be a whole number >= 1, got {value!r}", key)
    guidance = data.get("guidance")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise RequestError(f"recipe field 'guidance' must be a number, got {guidance!r}", "guidance")
    stack = data.get("stack")
    if not isinstance(stack, list) or not stack:
        raise RequestError("recipe field 'stack' must be a non-empty list of methods", "stack")
    items = []
    for index, item in enumerate(stack):
        if not isinstance(item, Mapping) or not isinstance(item.get("method"), str) \
                or not isinstance(item.get("fields"), Mapping):
            raise RequestError(f"recipe stack[{index}] must hold \"method\" (a name) and \"fields\" (its form values)",
                               f"stack[{index}]")
        items.append((item["method"], dict(item["fields"])))
    return Recipe(
        preset=data["preset"], pipeline_class=data["pipeline_class"], frames=data["frames"], height=data["height"],
        width=data["width"], steps=data["steps"], guidance=float(guidance), stack=tuple(items),
        tuning=_mapping(data, "tuning"), validation=_mapping(data, "validation"),
        front=tuple(data.get("front") or ()), environment=_mapping(data, "environment"), name=name)


def _mapping(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise RequestError(f"recipe field {key!r} must be an object, got {type(value).__name__}", key)
    return value


def apply_recipe(pipe: Any, recipe: str | Path | Mapping[str, Any] | Recipe, prompt: str | None = None):
    """Apply a recipe's stack to ``pipe`` (its class must be the one the recipe was tuned on);
    returns the stack's handle (``remove()`` restores the pipeline exactly) with the recipe on it
    (``handle.recipe.call_settings()``: the size and steps it was tuned at). A method that calibrates
    for its calls (MagCache) runs the plain pipeline once first, at those settings, on ``prompt``
    (default: the recipe's first tuning prompt)."""
    import torch

    from vdtome.methods.base import CallPlan
    from vdtome.methods.stack import apply_stack, prepare_stack

    recipe = load_recipe(recipe)
    if type(pipe).__name__ != recipe.pipeline_class:
        raise RequestError(f"recipe {recipe.label()} was tuned on a {recipe.pipeline_class} ({recipe.preset}); "
                           f"this pipeline is a {type(pipe).__name__}", "pipeline_class")
    calibration = prompt or next(iter(recipe.tuning.get("tuning_prompts") or ()), None) or "a video"

    def run_untimed() -> None:
        pipe(calibration, **recipe.call_settings(), generator=torch.Generator().manual_seed(0), output_type="latent")

    call = CallPlan(recipe.steps, recipe.frames, recipe.height, recipe.width, recipe.guidance)
    handle = apply_stack(pipe, prepare_stack(pipe, recipe.configs(), call, run_untimed))
    handle.recipe = recipe
    return handle


apply = apply_recipe  # ``vdtome.apply(pipe, recipe)``
