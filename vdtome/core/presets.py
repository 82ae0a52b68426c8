"""Model and prompt presets, loaded from the package data under ``vdtome/data/presets/``.

``vdtome/data/presets/models.json`` holds one entry per model (schema in its ``_comment`` and in
:func:`load_presets`); ``vdtome/data/presets/prompts/<set>.txt`` holds prompt sets, one prompt a line.
Nothing here downloads anything: hub presets only name their repositories; tiny presets name a
builder in :mod:`vdtome.offline.tiny` (see :func:`vdtome.offline.tiny.build_tiny`).
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DATA_DIR",
    "PRESETS_DIR",
    "Constraints",
    "GpuTime",
    "ModelPreset",
    "PresetError",
    "UnknownPresetError",
    "load_presets",
    "get_preset",
    "preset_names",
    "load_prompts",
    "prompt_sets",
]

#: The package's data (presets, prompt sets, sweeps, the shipped tiny weights), wherever it is installed.
DATA_DIR = Path(str(importlib.resources.files("vdtome") / "data"))
#: Default location of the preset files; ``VDTOME_PRESETS_DIR`` overrides.
PRESETS_DIR = Path(os.environ.get("VDTOME_PRESETS_DIR", DATA_DIR / "presets"))

_DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


class PresetError(ValueError):
    """A preset file is missing, malformed or fails validation (the message names file and field)."""


class UnknownPresetError(KeyError, ValueError):
    """No preset or prompt set of that name; the message lists the available names.

    Both a ``KeyError`` (lookup failed) and a ``ValueError`` (bad user input), so either ``except`` works.
    """

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------- constraints


def _nearest_on_grid(value: int, multiple: int, offset: int, low: int, high: int) -> int:
    """Nearest ``multiple * k + offset`` to ``value`` inside ``[low, high]`` (ties go to the smaller)."""
    lo_valid = offset + math.ceil((low - offset) / multiple) * multiple
    hi_valid = offset + math.floor((high - offset) / multiple) * multiple
    below = offset + math.floor((value - offset) / multiple) * multiple
    above = below + multiple
    best = below if value - below <= above - value else above
    return min(max(best, lo_valid), hi_valid)


@dataclass(frozen=True)
class Constraints:
    """Valid inputs of a model.

    ``num_frames = frames_multiple * k + frames_offset`` (k >= 0 integer) within
    ``[min_frames, max_frames]``; ``height`` and ``width`` multiples of ``side_multiple`` within
    ``[min_side, max_side]``. Bounds need not be valid values themselves; the effective bounds are the
    nearest valid values inside them.
    """

    frames_multiple: int
    frames_offset: int
    min_frames: int
    max_frames: int
    side_multiple: int
    min_side: int
    max_side: int

    def __post_init__(self) -> None:
        for name in ("frames_multiple", "side_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 <= self.frames_offset < self.frames_multiple and self.frames_multiple > 1:
            raise ValueError("frames_offset must be in [0, frames_multiple)")
        if self.valid_frame_range[0] > self.valid_frame_range[1]:
            raise ValueError(f"no valid frame count in [{self.min_frames}, {self.max_frames}] for {self.frames_rule}")
        if self.valid_side_range[0] > self.valid_side_range[1]:
            raise ValueError(f"no multiple of {self.side_multiple} in [{self.min_side}, {self.max_side}]")

    # -- rules

    @property
    def frames_rule(self) -> str:
        """Human form of the frame rule: ``"4k+1"``, ``"8k"``, ``"any"``."""
        if self.frames_multiple == 1:
            return "any"
        return f"{self.frames_multiple}k+{self.frames_offset}" if self.frames_offset else f"{self.frames_multiple}k"

    @property
    def valid_frame_range(self) -> tuple[int, int]:
        m, o = self.frames_multiple, self.frames_offset
        low = o + math.ceil((self.min_frames - o) / m) * m
        high = o + math.floor((self.max_frames - o) / m) * m
        return low, high

    @property
    def valid_side_range(self) -> tuple[int, int]:
        m = self.side_multiple
        return math.ceil(self.min_side / m) * m, math.floor(self.max_side / m) * m

    def nearest_frames(self, frames: int) -> int:
        return _nearest_on_grid(int(frames), self.frames_multiple, self.frames_offset, self.min_frames, self.max_frames)

    def nearest_side(self, side: int) -> int:
        return _nearest_on_grid(int(side), self.side_multiple, 0, self.min_side, self.max_side)

    # -- checking and snapping

    def _frame_problems(self, frames: int) -> list[str]:
        out = []
        nearest = self.nearest_frames(frames)
        if (frames - self.frames_offset) % self.frames_multiple:
            out.append(f"frames must be {self.frames_rule} (got {frames}; nearest valid {nearest})")
        if frames < self.min_frames:
            out.append(f"frames must be at least {self.min_frames} (got {frames}; nearest valid {nearest})")
        if frames > self.max_frames:
            out.append(f"frames must be at most {self.max_frames} (got {frames}; nearest valid {nearest})")
        return out

    def _side_problems(self, name: str, side: int) -> list[str]:
        out = []
        nearest = self.nearest_side(side)
        if side % self.side_multiple:
            out.append(f"{name} must be a multiple of {self.side_multiple} (got {side}; nearest valid {nearest})")
        if side < self.min_side:
            out.append(f"{name} must be at least {self.min_side} (got {side}; nearest valid {nearest})")
        if side > self.max_side:
            out.append(f"{name} must be at most {self.max_side} (got {side}; nearest valid {nearest})")
        return out

    def check(self, frames: int, height: int, width: int) -> list[str]:
        """Violation messages, each naming its rule, e.g. ``"frames must be 4k+1 (got 18; nearest valid 17)"``.

        Empty when the inputs are valid.
        """
        return [
            *self._frame_problems(int(frames)),
            *self._side_problems("height", int(height)),
            *self._side_problems("width", int(width)),
        ]

    def snap(self, frames: int, height: int, width: int) -> tuple[int, int, int, list[str]]:
        """Nearest valid ``(frames, height, width)`` plus one human note per changed value."""
        notes = []
        new_frames = self.nearest_frames(frames)
        if new_frames != frames:
            notes.append(f"frames {frames} -> {new_frames} ({self._frames_reason(int(frames))})")
        sides = []
        for name, side in (("height", height), ("width", width)):
            new = self.nearest_side(side)
            if new != side:
                notes.append(f"{name} {side} -> {new} ({self._side_reason(int(side))})")
            sides.append(new)
        return new_frames, sides[0], sides[1], notes

    def _frames_reason(self, frames: int) -> str:
        low, high = self.valid_frame_range
        if frames < low:
            return f"at least {low} frames"
        if frames > high:
            return f"at most {high} frames"
        return f"frames must be {self.frames_rule}"

    def _side_reason(self, side: int) -> str:
        low, high = self.valid_side_range
        if side < low:
            return f"min side {low}"
        if side > high:
            return f"max side {high}"
        return f"must be a multiple of {self.side_multiple}"

    def describe(self) -> str:
        """One line for a UI: ``"frames 4k+1 in [5, 81]; sides multiple of 16 in [256, 832]"``."""
        return (
            f"frames {self.frames_rule} in [{self.valid_frame_range[0]}, {self.valid_frame_range[1]}]; "
            f"sides multiple of {self.side_multiple} in [{self.valid_side_range[0]}, {self.valid_side_range[1]}]"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class GpuTime:
    """Rough GPU seconds of one request's parts at the preset's defaults, to ask ZeroGPU for enough
    time (too little kills the run, too much costs queue priority). Estimates, not measurements.

    ``load_s``: loading the weights onto the GPU; ``step_s``: one denoising step (every CFG branch);
    ``decode_s``: one VAE decode; ``text_s``: one prompt encoding (prompt and negative prompt).
    """

    load_s: float
    step_s: float
    decode_s: float
    text_s: float


@dataclass(frozen=True)
class ModelPreset:
    """One model preset. Exactly one of ``hub_id`` / ``builtin`` / ``local`` is set.

    ``local``: a folder written by ``save_pretrained`` (absolute; the presets file names it relative to
    itself), loaded through the same ``from_pretrained`` path as a hub id.

    ``dtype`` is a canonical torch dtype name (``"float32"``, ``"float16"``, ``"bfloat16"``);
    ``extras`` holds model-specific loading hints (``component_dtypes``, ``max_sequence_length``,
    ``scheduler``, ...). Treat the dict fields as read-only.

    ``timing_rounds``: default number of timing rounds (see :mod:`vdtome.measure.protocol`); ``timing_steps``:
    steps of the rounds after the first for a stack whose steps all cost alike (None: full
    length); ``gpu_memory_gb``:
    the GPU memory the loader needs at the defaults (everything on the GPU, no offload); ``gpu_time``:
    GPU-seconds estimates for ZeroGPU; ``vae_tiling``: decode in tiles (as the model's own example
    does); ``negative_prompt_unsupported``: why the model takes no negative prompt (None: it does).
    """

    name: str
    label: str
    family: str
    pipeline_class: str
    dtype: str
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    fps: int
    constraints: Constraints
    hardware: str
    requires_gpu: bool
    hub_id: str | None = None
    builtin: str | None = None
    builtin_kwargs: dict[str, Any] = field(default_factory=dict)
    local: str | None = None
    prompts: str | None = None  # the prompt set the model knows (vdtome/data/presets/prompts/<name>.txt)
    motion_adapter: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    timing_rounds: int = 1
    timing_steps: int | None = None
    gpu_memory_gb: float | None = None
    gpu_time: GpuTime | None = None
    vae_tiling: bool = False
    offload_below_gb: float | None = None  # on a GPU with less memory, the loader enables model CPU offload
    negative_prompt_unsupported: str | None = None
    # Per method name, the form fields whose defaults differ on this model ({"tome": {"ratio": 0.5}}):
    # chosen for the model (e.g. by a sweep), checked by the method's own fields where they are used.
    method_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    # How the memory plan sizes a hub model without its weights (vdtome.engine.plan): the denoiser's
    # and VAE's diffusers classes and configs, and the other components' published sizes.
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def is_builtin(self) -> bool:
        return self.builtin is not None

    @property
    def weights(self) -> str | None:
        """What ``from_pretrained`` loads: the local folder or the hub id (None for built-in presets)."""
        return self.local or self.hub_id

    @property
    def source(self) -> dict[str, Any]:
        if self.builtin is not None:
            return {"builtin": self.builtin, "kwargs": dict(self.builtin_kwargs)}
        if self.local is not None:
            return {"local": self.local}
        out: dict[str, Any] = {"hub_id": self.hub_id}
        if self.motion_adapter:
            out["motion_adapter"] = self.motion_adapter
        return out

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def defaults(self) -> dict[str, Any]:
        """Default pipeline call arguments (``fps`` is for the video file, not the pipeline)."""
        return {
            "num_frames": self.num_frames,
            "height": self.height,
            "width": self.width,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def conditioning_kwargs(max_sequence_length: int | None, fps: int, parameters: Collection[str]) -> dict[str, Any]:
    """What a pipeline call is conditioned on besides its size, steps and guidance: one rule for the
    engine's calls and a recipe's. The text length a model was trained at, where it has one, and the
    frame rate for a pipeline whose call takes it (``parameters``: LTX conditions on ``frame_rate``;
    it is the rate the video is written at)."""
    kwargs: dict[str, Any] = {}
    if max_sequence_length is not None:
        kwargs["max_sequence_length"] = max_sequence_length
    if "frame_rate" in parameters:
        kwargs["frame_rate"] = fps
    return kwargs


# -------------------------------------------------------------------------------------------- loading


class _Reader:
    """Typed field access with error messages naming the file, the preset and the field."""

    def __init__(self, path: Path, where: str, data: Any):
        self.path, self.where, self.data = path, where, data
        if not isinstance(data, Mapping):
            self.fail("", f"must be an object, got {type(data).__name__}")

    def fail(self, key: str, message: str):
        field_name = f"{self.where}.{key}" if key else self.where
        raise PresetError(f"{self.path}: {field_name}: {message}")

    def get(self, key: str, kind: type | tuple[type, ...], required: bool = True, default: Any = None) -> Any:
        if key not in self.data:
            if required:
                self.fail(key, "missing required field")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if bool not in kinds and isinstance(value, bool) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            self.fail(key, f"must be {names}, got {value!r}")
        return value

    def positive_int(self, key: str) -> int:
        value = self.get(key, int)
        if value < 1:
            self.fail(key, f"must be a positive integer, got {value!r}")
        return value

    def text(self, key: str, required: bool = True) -> str | None:
        value = self.get(key, str, required=required)
        if required and not value.strip():
            self.fail(key, "must not be empty")
        return value

    def sub(self, key: str, required: bool = True) -> _Reader | None:
        if key not in self.data and not required:
            return None
        return _Reader(self.path, f"{self.where}.{key}", self.get(key, dict))


def _parse_constraints(r: _Reader) -> Constraints:
    values = {
        key: r.positive_int(key)
        for key in ("frames_multiple", "min_frames", "max_frames", "side_multiple", "min_side", "max_side")
    }
    offset = r.get("frames_offset", int)
    if offset < 0 or (values["frames_multiple"] > 1 and offset >= values["frames_multiple"]):
        r.fail("frames_offset", f"must be in [0, frames_multiple), got {offset}")
    for low, high in (("min_frames", "max_frames"), ("min_side", "max_side")):
        if values[low] > values[high]:
            r.fail(low, f"{low} ({values[low]}) > {high} ({values[high]})")
    try:
        return Constraints(frames_offset=offset, **values)
    except ValueError as exc:
        r.fail("", str(exc))


def _parse_method_defaults(r: _Reader) -> dict[str, dict[str, Any]]:
    """``method_defaults``: method name -> {form field: value}; the values' own rules are the
    method's (checked by :func:`vdtome.methods.preset_form_defaults`, and for every shipped preset by a test)."""
    table = r.get("method_defaults", dict, required=False, default={})
    for method, values in table.items():
        if not isinstance(values, Mapping):
            r.fail(f"method_defaults.{method}", f"must be an object of form fields, got {values!r}")
    return {method: dict(values) for method, values in table.items()}


def _parse_preset(path: Path, index: int, raw: Any) -> ModelPreset:
    name = raw.get("name") if isinstance(raw, Mapping) else None
    r = _Reader(path, f"presets[{index}]" + (f" ({name})" if isinstance(name, str) else ""), raw)
    name = r.text("name")
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
        r.fail("name", f"must be lowercase letters, digits, '.', '_' or '-', got {name!r}")

    source = r.sub("source")
    hub_id = source.get("hub_id", str, required=False)
    builtin = source.get("builtin", str, required=False)
    local = source.get("local", str, required=False)
    if sum(value is not None for value in (hub_id, builtin, local)) != 1:
        source.fail("", "needs exactly one of 'hub_id', 'builtin' or 'local'")
    if local is not None:
        if Path(local).is_absolute() or "\\" in local:
            source.fail("local", f"must be a folder relative to the presets file, got {local!r}")
        local = str((path.parent / local).resolve())
    if hub_id is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id):
        source.fail("hub_id", f"must look like 'owner/name', got {hub_id!r}")
    motion_adapter = source.get("motion_adapter", str, required=False)
    builtin_kwargs = source.get("kwargs", dict, required=False, default={})

    dtype_raw = r.text("dtype")
    dtype = _DTYPE_ALIASES.get(dtype_raw.lower())
    if dtype is None:
        r.fail("dtype", f"unknown dtype {dtype_raw!r}; use one of {sorted(set(_DTYPE_ALIASES.values()))}")

    defaults = r.sub("defaults")
    constraints = _parse_constraints(r.sub("constraints"))
    frames, height, width = (defaults.positive_int(k) for k in ("num_frames", "height", "width"))
    problems = constraints.check(frames, height, width)
    if problems:
        defaults.fail("", "defaults violate the constraints: " + "; ".join(problems))
    guidance = defaults.get("guidance_scale", (int, float))
    if guidance < 0:
        defaults.fail("guidance_scale", f"must be >= 0, got {guidance}")
    rounds = defaults.positive_int("timing_rounds")
    timing_steps = defaults.get("timing_steps", int, required=False)
    if timing_steps is not None and timing_steps < 3:
        defaults.fail("timing_steps", f"must be at least 3 (a step after the first to measure), got {timing_steps}")
    requires_gpu = r.get("requires_gpu", bool)
    gpu_memory_gb = r.get("gpu_memory_gb", (int, float), required=requires_gpu)
    if gpu_memory_gb is not None and gpu_memory_gb <= 0:
        r.fail("gpu_memory_gb", f"must be positive, got {gpu_memory_gb}")
    gpu_time = _parse_gpu_time(r.sub("gpu_time", required=requires_gpu))
    unsupported = r.get("negative_prompt_unsupported", str, required=False)

    return ModelPreset(
        name=name,
        label=r.text("label"),
        family=r.text("family"),
        pipeline_class=r.text("pipeline_class"),
        dtype=dtype,
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=defaults.positive_int("num_inference_steps"),
        guidance_scale=float(guidance),
        fps=defaults.positive_int("fps"),
        constraints=constraints,
        hardware=r.text("hardware"),
        requires_gpu=requires_gpu,
        hub_id=hub_id,
        builtin=builtin,
        builtin_kwargs=dict(builtin_kwargs),
        local=local,
        prompts=r.get("prompts", str, required=False),
        motion_adapter=motion_adapter,
        extras=dict(r.get("extras", dict, required=False, default={})),
        notes=r.get("notes", str, required=False, default=""),
        method_defaults=_parse_method_defaults(r),
        timing_rounds=rounds,
        timing_steps=timing_steps,
        gpu_memory_gb=None if gpu_memory_gb is None else float(gpu_memory_gb),
        gpu_time=gpu_time,
        vae_tiling=r.get("vae_tiling", bool, required=False, default=False),
        offload_below_gb=r.get("offload_below_gb", (int, float), required=False),
        negative_prompt_unsupported=unsupported,
        memory=dict(r.get("memory", dict, required=False, default={})),
    )


def _parse_gpu_time(r: _Reader | None) -> GpuTime | None:
    if r is None:
        return None
    values = {}
    for key in ("load_s", "step_s", "decode_s", "text_s"):
        value = r.get(key, (int, float))
        if value < 0:
            r.fail(key, f"must be >= 0 seconds, got {value}")
        values[key] = float(value)
    return GpuTime(**values)


def load_presets(path: str | os.PathLike | None = None) -> dict[str, ModelPreset]:
    """Load and validate model presets, in file order, keyed by name.

    ``path``: a JSON file (``{"presets": [...]}``) or a directory holding ``models.json``; default
    ``vdtome/data/presets/models.json``. Raises :class:`PresetError` naming the file and the offending field.
    """
    path = Path(path) if path is not None else PRESETS_DIR / "models.json"
    if path.is_dir():
        path = path / "models.json"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PresetError(f"{path}: cannot read preset file: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PresetError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, Mapping) or not isinstance(data.get("presets"), list):
        raise PresetError(f"{path}: presets: missing required field (expected {{\"presets\": [...]}})")
    presets: dict[str, ModelPreset] = {}
    for index, raw in enumerate(data["presets"]):
        preset = _parse_preset(path, index, raw)
        if preset.name in presets:
            raise PresetError(f"{path}: presets[{index}].name: duplicate preset name {preset.name!r}")
        presets[preset.name] = preset
    if not presets:
        raise PresetError(f"{path}: presets: no presets defined")
    return presets


def preset_names(path: str | os.PathLike | None = None) -> list[str]:
    return list(load_presets(path))


def get_preset(name: str, presets: Mapping[str, ModelPreset] | None = None) -> ModelPreset:
    """The preset called ``name``; :class:`UnknownPresetError` (a ``ValueError`` and ``KeyError``)
    listing the available names otherwise."""
    presets = load_presets() if presets is None else presets
    try:
        return presets[name]
    except (KeyError, TypeError):
        raise UnknownPresetError(
            f"unknown model preset {name!r}; available: {', '.join(presets)}"
        ) from None


# -------------------------------------------------------------------------------------------- prompts


def prompt_sets(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the prompt sets (``vdtome/data/presets/prompts/<name>.txt``)."""
    directory = Path(directory) if directory is not None else PRESETS_DIR / "prompts"
    return sorted(p.stem for p in directory.glob("*.txt"))


def load_prompts(set_name: str = "default", directory: str | os.PathLike | None = None) -> list[str]:
    """Prompts of a set, one a line, in file order; blank lines and lines starting with ``#`` skipped."""
    directory = Path(directory) if directory is not None else PRESETS_DIR / "prompts"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", set_name or "") or set_name.endswith(".txt"):
        raise UnknownPresetError(f"invalid prompt set name {set_name!r}; available: {', '.join(prompt_sets(directory))}")
    path = directory / f"{set_name}.txt"
    if not path.is_file():
        raise UnknownPresetError(f"unknown prompt set {set_name!r}; available: {', '.join(prompt_sets(directory))}")
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(line)
    return prompts
