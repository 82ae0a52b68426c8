"""What one visitor may ask of a shared server, set by its operator through environment variables.

A public app is a shared machine: one visitor must not fill the queue, and one allowed request
must not hold the only GPU for an hour. The work of a request is counted in the unit its cost
grows with, frame-pixel steps (denoising steps x frames x height x width), summed over every
timed denoising call (2 sides x timing rounds x sweep points; short timing rounds count their
own steps). Warm-ups and decoding are small
beside it and not counted.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vdtome.core.presets import ModelPreset
from vdtome.engine.request import RequestError, ResolvedSettings
from vdtome.measure.protocol import plan_calls

# Without an operator setting a preset allows this multiple of its default request's work: a
# sweep of the default 4 ratios, or twice the frames at the default size, fits; 500 steps do not.
DEFAULT_WORK_FACTOR = 16

ENV_QUEUE_SIZE = "VDTOME_QUEUE_SIZE"
ENV_QUEUE_PER_SESSION = "VDTOME_QUEUE_PER_SESSION"
ENV_QUEUE_PER_ADDRESS = "VDTOME_QUEUE_PER_ADDRESS"
ENV_MAX_WORK = "VDTOME_MAX_WORK"
ENV_HISTORY_ROWS = "VDTOME_HISTORY_ROWS"
ENV_OUTPUTS_MB = "VDTOME_OUTPUTS_MB"
ENV_CACHE_MB = "VDTOME_CACHE_MB"
ENV_SESSION_TTL_S = "VDTOME_SESSION_TTL_S"
ENV_SESSION_GRACE_S = "VDTOME_SESSION_GRACE_S"
ENV_SESSIONS_MAX = "VDTOME_SESSIONS_MAX"
ENV_TUNE_MINUTES = "VDTOME_TUNE_MINUTES"
ENV_CUSTOM_MODEL_ROOT = "VDTOME_CUSTOM_MODEL_ROOT"


# The whole-number settings and the variables that set them.
COUNT_SETTINGS = {
    "queue_size": ENV_QUEUE_SIZE,
    "queue_per_session": ENV_QUEUE_PER_SESSION,
    "queue_per_address": ENV_QUEUE_PER_ADDRESS,
    "history_rows": ENV_HISTORY_ROWS,
    "outputs_mb": ENV_OUTPUTS_MB,
    "cache_mb": ENV_CACHE_MB,
    "session_ttl_s": ENV_SESSION_TTL_S,
    "session_grace_s": ENV_SESSION_GRACE_S,
    "sessions_max": ENV_SESSIONS_MAX,
    "tune_minutes": ENV_TUNE_MINUTES,
}


def work(rounds: int, steps: int, frames: int, height: int, width: int, points: int = 1,
         round_steps: int | None = None) -> int:
    """Frame-pixel steps of the timed denoising calls of the protocol's schedule (2 sides, the
    first round of ``steps``, the others of ``round_steps``: short rounds; default ``steps``) x
    sweep points x frames x height x width."""
    schedule = plan_calls(rounds, steps, steps if round_steps is None else round_steps, warmup_steps=2,
                          warm_pipeline=False)
    return points * schedule.timed_steps * frames * height * width


def default_work(preset: ModelPreset) -> int:
    """Frame-pixel steps of one request at the preset's defaults."""
    return work(preset.timing_rounds, preset.num_inference_steps, preset.num_frames, preset.height, preset.width,
                round_steps=min(preset.timing_steps or preset.num_inference_steps, preset.num_inference_steps))


def request_work(settings: ResolvedSettings, points: int = 1) -> int:
    s = settings
    return work(s.rounds, s.steps, s.frames, s.height, s.width, points, s.round_steps)


@dataclass(frozen=True)
class ServiceLimits:
    """The operator's limits (``from_env``); every field has a default fit for a public Space."""

    queue_size: int = 16  # requests waiting in Gradio's queue, in all (the running one not counted)
    queue_per_session: int = 2  # requests of one browser session (or API client) queued or running
    queue_per_address: int = 4  # of one network address, whatever session ids it sends
    max_work: Mapping[str, int] = field(default_factory=dict)  # per preset; absent: DEFAULT_WORK_FACTOR x default
    history_rows: int = 100  # rows of session history kept (the oldest go first)
    outputs_mb: int = 1024  # comparison folders on disk
    cache_mb: int = 1024  # Gradio's copies of the files it serves
    session_ttl_s: int = 3600  # a session's server-side state is released after this long idle (vdtome.web.sessions)
    session_grace_s: int = 60  # ... and this long after its tab closed (a tab reconnecting sooner keeps it)
    sessions_max: int = 500  # sessions held at most (Gradio's LRU cap; ~0.5 MB each: ~250 MB)
    tune_minutes: int = 10  # the longest search a tune from the page may run (its validation comes after)
    custom_model_root: Path | None = None  # local folders custom weights may come from (None: hub ids only)

    def __post_init__(self) -> None:
        for name in COUNT_SETTINGS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
        if self.session_grace_s > self.session_ttl_s:
            raise ValueError(f"{ENV_SESSION_GRACE_S} ({self.session_grace_s} s) must be at most {ENV_SESSION_TTL_S} "
                             f"({self.session_ttl_s} s): a closed tab's session is released after the grace, an "
                             "idle one after the TTL")
        for preset, work in self.max_work.items():
            if isinstance(work, bool) or not isinstance(work, int) or work < 1:
                raise ValueError(f"max_work for {preset} must be a whole number of at least 1, got {work!r}")

    @classmethod
    def from_env(cls, presets: Mapping[str, ModelPreset], environ: Mapping[str, str] | None = None) -> ServiceLimits:
        """Limits from ``VDTOME_*`` variables; a malformed one stops the app with a message naming it."""
        env = os.environ if environ is None else environ
        values = {}
        for name, variable in COUNT_SETTINGS.items():
            if env.get(variable, "").strip():
                values[name] = _positive_int(variable, env[variable])
        values["max_work"] = _max_work(env.get(ENV_MAX_WORK, ""), presets)
        root = env.get(ENV_CUSTOM_MODEL_ROOT, "").strip()
        if root:
            if not Path(root).is_dir():
                raise ValueError(f"{ENV_CUSTOM_MODEL_ROOT}={root!r} is not a folder")
            values["custom_model_root"] = Path(root).resolve()
        return cls(**values)

    def work_limit(self, preset: ModelPreset) -> int:
        return self.max_work.get(preset.name, DEFAULT_WORK_FACTOR * default_work(preset))

    def check_work(self, preset: ModelPreset, settings: ResolvedSettings, points: int = 1,
                   points_name: str = "sweep points") -> None:
        """Refuse, before it is queued, a request above the preset's work limit, with its numbers.
        ``points``: comparisons of these settings in the request (a sweep's points, a benchmark's rows)."""
        needed, limit = request_work(settings, points), self.work_limit(preset)
        if needed <= limit:
            return
        s = settings
        sweep = f" x {points} {points_name}" if points > 1 else ""
        pixels = 2 * points * s.frames * s.height * s.width
        later = (s.rounds - 1) * s.round_steps  # steps of the rounds after the first, per side
        if s.round_steps == s.steps:
            rounds = f"{s.rounds} timing rounds{sweep} x {s.steps} steps"
        else:
            rounds = (f"{s.steps + later} steps per side (timing rounds: the first of {s.steps} steps, "
                      f"{s.rounds - 1} of {s.round_steps}){sweep}")
        most = limit // pixels - later if s.round_steps != s.steps else limit // (pixels * s.rounds)
        fit = f"; at these settings at most {most} steps fit" if most >= 1 else ""
        raise RequestError(
            f"this request is too large for this server: 2 sides x {rounds} x {s.frames} frames x {s.height}x{s.width} "
            f"pixels = {needed:,} frame-pixel steps; the limit for {preset.label} is {limit:,}{fit}. Lower the steps, "
            f"frames, size, timing rounds or {points_name}.",
            "steps",
        )


def _positive_int(variable: str, text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{variable} must be a whole number, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{variable} must be at least 1, got {value}")
    return value


def _work_number(variable: str, text: str) -> int:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{variable}: {text!r} is not a number (write e.g. 2e11)") from None
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{variable}: {text!r} must be a finite number of at least 1")
    return int(value)


def _max_work(text: str, presets: Mapping[str, ModelPreset]) -> dict[str, int]:
    """``VDTOME_MAX_WORK``: one number for every preset (the largest request), or
    ``name=number`` pairs separated by commas (a bare number among them sets the rest)."""
    limits: dict[str, int] = {}
    default = None
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part:
            default = _work_number(ENV_MAX_WORK, part)
            continue
        name, number = (x.strip() for x in part.split("=", 1))
        if name not in presets:
            raise ValueError(f"{ENV_MAX_WORK}: unknown preset {name!r}; presets: {', '.join(presets)}")
        limits[name] = _work_number(ENV_MAX_WORK, number)
    if default is not None:
        limits = {name: default for name in presets} | limits
    return limits
