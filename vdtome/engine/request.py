"""What a comparison is asked and what it returns: the request, its settings resolved against the
model preset (sizes the model cannot take are snapped or refused), and the typed result.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vdtome.core.presets import ModelPreset, conditioning_kwargs, get_preset
from vdtome.core.validation import RequestError, shown, text, whole_number
from vdtome.engine.fidelity import Fidelity, Temporal
from vdtome.engine.plan import PlanCheck
from vdtome.measure.compilation import CompilationReport
from vdtome.measure.memory import MemoryReport
from vdtome.measure.protocol import (
    MIN_TIMING_STEPS,
    TimingSummary,
)
from vdtome.measure.stats import Ratio
from vdtome.methods import (
    MethodReport,
    check_stack,
    default_stack,
)

SCHEMA_VERSION = 3
MAX_STEPS = 500
MAX_GUIDANCE = 50.0
MAX_ROUNDS = 20




@dataclass(frozen=True)
class ComparisonRequest:
    """What to compare. ``None`` sizes, steps, guidance and rounds take the preset's defaults.

    ``methods``: the stack, registered method configs applied in this order (see
    :mod:`vdtome.methods`; a single config is a stack of one; None: the preset's default stack); ``rounds``:
    timing rounds, each a pair of calls (see :mod:`vdtome.measure.protocol`); ``timing_steps``: steps of
    the rounds after the first when the stack's steps all cost alike (None: the preset's choice;
    0: full length); ``snap``: move invalid frame counts and sizes to
    the nearest valid ones (the result says so) instead of refusing them; ``reuse_baseline``: take
    the baseline *video* from the cache when the same inputs ran before (its timing is measured
    again either way).
    """

    preset: str
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    methods: tuple[Any, ...] | None = None
    rounds: int | None = None
    timing_steps: int | None = None
    warmup_steps: int = 2
    snap: bool = True
    reuse_baseline: bool = True

    def __post_init__(self) -> None:
        if self.methods is None:  # the preset's default stack (token merging at its settings for this model)
            try:
                object.__setattr__(self, "methods", default_stack(get_preset(self.preset)))
            except (KeyError, ValueError):  # an unknown preset: resolve() refuses it, naming the presets
                object.__setattr__(self, "methods", ())
        if not isinstance(self.methods, (tuple, list)):
            object.__setattr__(self, "methods", (self.methods,))
        object.__setattr__(self, "methods", tuple(self.methods))


@dataclass(frozen=True)
class MethodResult:
    """One method of the stack: its registered name, the config it ran with, what it reported."""

    method: str
    label: str
    config: dict[str, Any]
    report: MethodReport

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "config": self.config, "report": self.report.to_dict()}


@dataclass(frozen=True)
class ResolvedSettings:
    """The request after defaults, validation and snapping: exactly what the pipeline is called with."""

    preset: str
    prompt: str
    negative_prompt: str
    seed: int
    frames: int
    height: int
    width: int
    steps: int
    guidance: float
    fps: int
    rounds: int
    warmup_steps: int
    max_sequence_length: int | None = None  # the preset's text length (a model trained at one length)
    timing_steps: int | None = None  # steps of the rounds after the first (None: as many as ``steps``)

    @property
    def round_steps(self) -> int:
        """Steps of the rounds after the first."""
        return self.steps if self.timing_steps is None else self.timing_steps

    @property
    def short_rounds(self) -> bool:
        """The later rounds are shorter than the first: calls are compared by their mean step."""
        return self.round_steps < self.steps and self.rounds > 1

    def video_key(self) -> tuple:
        """Everything that shapes the baseline video (not how it is timed)."""
        return (self.preset, self.prompt, self.negative_prompt, self.seed, self.frames, self.height, self.width,
                self.steps, self.guidance)

    def call_kwargs(self, parameters: frozenset[str] = frozenset()) -> dict[str, Any]:
        """Pipeline call arguments; ``parameters``: what the pipeline's ``__call__`` accepts."""
        kwargs = dict(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt or None,
            num_frames=self.frames,
            height=self.height,
            width=self.width,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
        )
        return kwargs | conditioning_kwargs(self.max_sequence_length, self.fps, parameters)


@dataclass(frozen=True, eq=False)
class VideoRun:
    """A decoded video and what was measured about it (what the baseline cache keeps: no timing)."""

    frames: np.ndarray  # (F, H, W, 3) float in [0, 1], as the pipeline returned it
    memory: MemoryReport  # of the call that decoded it
    temporal: Temporal | None
    nonfinite_values: int
    measured_at: float  # time.time() of that call

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames": int(self.frames.shape[0]),
            "height": int(self.frames.shape[1]),
            "width": int(self.frames.shape[2]),
            "memory": self.memory.to_dict(),
            "temporal": None if self.temporal is None else self.temporal.to_dict(),
            "nonfinite_values": self.nonfinite_values,
            "measured_at": self.measured_at,
        }


@dataclass(frozen=True, eq=False)
class ComparisonResult:
    settings: ResolvedSettings
    methods: tuple[MethodResult, ...]
    stack: str  # the stack in one line: "tome ratio 0.5 stride 1x2x2 + first_block_cache threshold 0.2"
    baseline: VideoRun | None
    accelerated: VideoRun | None
    baseline_reused: bool
    timing: TimingSummary | None = None
    fidelity: Fidelity | None = None
    notes: tuple[str, ...] = ()
    error: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    elapsed_s: float | None = None  # wall seconds of the request: loading, every call, metrics (not the files)
    memory_plan: PlanCheck | None = None  # the memory plan's estimate of both sides, next to what was measured
    compilation: CompilationReport | None = None  # what torch.compile did (None: nothing was compiled)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def warnings(self) -> tuple[str, ...]:
        busy = None if self.timing is None else self.timing.busy_warning
        return (busy,) if busy else ()

    def speedup(self, phase: str = "end_to_end") -> Ratio | None:
        """The protocol's paired ratio for ``"denoising"`` or ``"end_to_end"`` (None if not measured)."""
        if self.timing is None:
            return None
        figures = {"denoising": self.timing.denoising, "end_to_end": self.timing.end_to_end}[phase]
        return figures.ratio

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "ok": self.ok,
            "error": self.error,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "settings": vars(self.settings).copy(),
            "stack": self.stack,
            "methods": [method.to_dict() for method in self.methods],
            "baseline_reused": self.baseline_reused,
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "accelerated": None if self.accelerated is None else self.accelerated.to_dict(),
            "timing": None if self.timing is None else self.timing.to_dict(),
            "fidelity": None if self.fidelity is None else self.fidelity.to_dict(),
            "environment": self.environment,
            "elapsed_s": self.elapsed_s,
            "memory_plan": None if self.memory_plan is None else self.memory_plan.to_dict(),
            "compilation": None if self.compilation is None else self.compilation.to_dict(),
            "files": {name: Path(path).name for name, path in self.files.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)


# ---- request validation --------------------------------------------------------------------------


def resolve(request: ComparisonRequest, preset: ModelPreset) -> tuple[ResolvedSettings, list[str]]:
    """Apply defaults and check every rule; returns the settings and notes on what was snapped."""
    prompt = text("prompt", request.prompt, "prompt")
    if not prompt:
        raise RequestError("prompt is empty: describe the video to generate", "prompt")
    negative = text("negative prompt", request.negative_prompt, "negative_prompt")
    if negative and preset.negative_prompt_unsupported:
        raise RequestError(f"negative prompt must be empty for {preset.label}: {preset.negative_prompt_unsupported}",
                           "negative_prompt")
    seed = whole_number("seed", request.seed, 0, 2**63 - 1, "seed")
    steps = whole_number("steps", preset.num_inference_steps if request.steps is None else request.steps,
                         1, MAX_STEPS, "steps")
    # At least 2: some schedulers (LTX's shifted flow match) cannot take a 1-step call.
    warmup = whole_number("warm-up steps", request.warmup_steps, 2, MAX_STEPS)
    rounds = whole_number("timing rounds", preset.timing_rounds if request.rounds is None else request.rounds,
                          1, MAX_ROUNDS, "rounds")
    guidance = preset.guidance_scale if request.guidance is None else request.guidance
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise RequestError(f"guidance must be a finite number, got {shown(guidance)}", "guidance")
    if not 0.0 <= guidance <= MAX_GUIDANCE:
        raise RequestError(f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {guidance:g}", "guidance")
    methods = check_stack(request.methods)  # unknown methods and unsound stacks fail here, before any work
    for method in methods:
        if method.needs_guidance and guidance <= 1.0:
            raise RequestError(f"{method.label} needs classifier-free guidance (guidance above 1), got {guidance:g}",
                               "guidance")
    asked = preset.timing_steps if request.timing_steps is None else request.timing_steps
    if asked is None or asked == 0:
        timing_steps = None
    else:
        timing_steps = whole_number("timing steps", asked, MIN_TIMING_STEPS, MAX_STEPS, "timing_steps")
    frames = whole_number("frames", preset.num_frames if request.frames is None else request.frames, 1, 10_000, "frames")
    height = whole_number("height", preset.height if request.height is None else request.height, 1, 10_000, "height")
    width = whole_number("width", preset.width if request.width is None else request.width, 1, 10_000, "width")
    notes: list[str] = []
    if timing_steps is not None and timing_steps < steps and rounds > 1:
        differ = [m.label for m, c in zip(methods, request.methods) if not m.steps_alike(c)]
        if differ:
            notes.append(f"every round runs all {steps} steps: the steps of {', '.join(differ)} differ in cost, so "
                         f"short rounds of {timing_steps} steps would misjudge it")
            timing_steps = None
    if timing_steps is not None and timing_steps >= steps:
        timing_steps = None
    problems = preset.constraints.check(frames, height, width)
    if problems:
        if not request.snap:
            raise RequestError(f"{preset.name}: " + "; ".join(problems), problems[0].split(" ", 1)[0])
        frames, height, width, snapped = preset.constraints.snap(frames, height, width)
        notes.extend(f"snapped {note}" for note in snapped)
    settings = ResolvedSettings(
        preset=preset.name,
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        frames=frames,
        height=height,
        width=width,
        steps=steps,
        guidance=float(guidance),
        fps=preset.fps,
        rounds=rounds,
        warmup_steps=warmup,
        max_sequence_length=preset.extras.get("max_sequence_length"),
        timing_steps=timing_steps,
    )
    return settings, notes


def unknown_words_note(pipe: Any, prompt: str) -> list[str]:
    """A note naming the prompt's words the model's tokenizer maps to its unknown token: a word-level
    tokenizer such as the tiny models' knows only its vocabulary, and every other word reads the same."""
    tokenizer = getattr(pipe, "tokenizer", None)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not getattr(tokenizer, "is_fast", False):
        return []
    encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    words = [prompt[a:b] for token, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"])
             if token == unk and any(ch.isalnum() for ch in prompt[a:b])]
    if not words:
        return []
    unique = list(dict.fromkeys(words))
    listed = ", ".join(repr(word) for word in unique[:12]) + (f" and {len(unique) - 12} more" if len(unique) > 12 else "")
    if len(unique) == 1:
        return [f"the model does not know the word {listed} (its tokenizer reads it as an unknown token): the video "
                "cannot follow it"]
    return [f"the model does not know the words {listed} (its tokenizer reads each as one unknown token): "
            "the video cannot follow them"]
