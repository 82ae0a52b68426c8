"""The web app's logic that does not need Gradio: the form, its values to a request, history, sweeps.

The form is declared here once, from the method registry: ``app.py`` builds one widget per field
and wires the events by these names, so a new method never edits the app. What a user can type is
checked here (and tested) with messages that name the field and the rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .compare import ComparisonRequest, ComparisonResult, resolve
from .methods import METHODS, FormField, Method, check_stack
from .metrics import PSNR_CAP_DB
from .presets import ModelPreset, get_preset
from .protocol import GpuEstimate, estimate_gpu_time
from .measure import environment_line
from .report import metric_rows, protocol_line
from .stats import Ratio
from .validation import RequestError, boolean, decimal_list

MAX_SWEEP_POINTS = 8

# The chart's y axis: baseline time / accelerated time (a ratio axis; the table says "x slower").
PLOT_SPEEDUP = "end-to-end speedup (below 1 = slower)"

# The request's own fields, then the methods' (see api_fields).
REQUEST_FIELDS = ("preset", "prompt", "negative_prompt", "seed", "frames", "height", "width", "steps", "guidance",
                  "rounds")
CUSTOM_MODEL = "custom_model"
# The sweep's values box keeps the name it had when only ratios could be swept (API clients send it).
SWEEP_VALUES = "ratios"
SWEEP_FIELD = "sweep_field"


def api_fields(sweep: bool) -> tuple[str, ...]:
    """The endpoints' parameters in order. New parameters are only ever appended, so positional API
    calls written before them keep working: the request's fields, the first registered method's
    fields (token merging: the app's only method before plug-ins) and the custom weights, then (for a
    sweep) the values to sweep; then the first method's switch and (for a sweep) the field to sweep;
    then one block per other method, its switch and its fields, in registration order (a new method
    registers last)."""
    first, *others = METHODS.values()
    names = [*REQUEST_FIELDS, *(f.name for f in first.fields), CUSTOM_MODEL]
    names += [SWEEP_VALUES, first.enable_field, SWEEP_FIELD] if sweep else [first.enable_field]
    for method in others:
        names += [method.enable_field, *(f.name for f in method.fields)]
    return tuple(names)


def appended_from(sweep: bool) -> int:
    """How many of :func:`api_fields` a client must send: those of the app before methods stacked;
    the ones after were appended later and take their defaults when left out."""
    first = next(iter(METHODS.values()))
    return len(REQUEST_FIELDS) + len(first.fields) + 1 + int(sweep)


def method_defaults() -> dict[str, Any]:
    """Every method field's default and every switch (on for methods on by default)."""
    values: dict[str, Any] = {}
    for method in METHODS.values():
        values[method.enable_field] = method.on_by_default
        values.update(method.form_defaults())
    return values | {SWEEP_FIELD: sweep_choices()[0][1]}


def stack_from_form(values: Mapping[str, Any]) -> tuple[Any, ...]:
    """The configs of the methods switched on, in registry order; every value checked, the stack
    too (a stack the rules refuse is refused here, naming the rule)."""
    configs = []
    for method in METHODS.values():
        if boolean(f"use {method.label}", values.get(method.enable_field, method.on_by_default), method.enable_field):
            configs.append(method.from_form(values))
    if not configs:
        first = next(iter(METHODS.values()))
        raise RequestError("switch on at least one method (token merging at ratio 0 is the A/A check)",
                           first.enable_field)
    check_stack(configs)
    return tuple(configs)


def sweep_choices() -> list[tuple[str, str]]:
    """(label, field name) of every sweepable field of every method."""
    return [(f"{m.label} · {f.label}", f.name) for m in METHODS.values() for f in m.fields if f.sweepable]


def sweep_suggestion(name: str) -> str:
    """The values the sweep box offers for a sweepable field."""
    return _sweepable(name)[1].sweep_suggestion()


def _sweepable(name: Any) -> tuple[Method, FormField]:
    for method in METHODS.values():
        for form_field in method.fields:
            if form_field.sweepable and form_field.name == name:
                return method, form_field
    names = ", ".join(name for _, name in sweep_choices())
    raise RequestError(f"sweep field must be a sweepable field ({names}), got {name!r}", SWEEP_FIELD)


def sweep_stacks(values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """One stack per value of the swept field, in ascending order (each checked by its method's
    rules: a value a method refuses is refused naming the sweep and the rule)."""
    method, form_field = _sweepable(values.get(SWEEP_FIELD, "ratio"))
    if not boolean(f"use {method.label}", values.get(method.enable_field, method.on_by_default), method.enable_field):
        raise RequestError(f"the sweep varies {form_field.label.lower()} of {method.label}, which is switched off",
                           SWEEP_FIELD)
    numbers = sorted(decimal_list("sweep values", values.get(SWEEP_VALUES), SWEEP_VALUES, MAX_SWEEP_POINTS))
    stacks = []
    for number in numbers:
        point = int(number) if form_field.kind == "integer" and float(number).is_integer() else number
        try:
            stacks.append(stack_from_form({**values, form_field.name: point}))
        except RequestError as error:
            raise RequestError(f"sweep value {number:g}: {error}", SWEEP_VALUES) from None
    return stacks


def preset_choice_label(preset: ModelPreset, has_gpu: bool) -> str:
    if preset.requires_gpu and not has_gpu:
        return f"{preset.label} (unavailable: needs a GPU)"
    return preset.label


def preset_info(preset: ModelPreset, has_gpu: bool) -> str:
    """Markdown shown under the model picker: hardware note and the model's input rules."""
    lines = [f"**{preset.label}**", f"Hardware: {preset.hardware}", f"Inputs: {preset.constraints.describe()}.",
             f"Timing rounds by default: {preset.timing_rounds}."]
    if preset.requires_gpu and not has_gpu:
        lines.insert(1, "**Unavailable here: this machine has no GPU.**")
    if not preset.is_builtin:
        lines.append(f"Weights: `{preset.hub_id}` (loaded from the local Hugging Face cache or the hub).")
    return "\n\n".join(lines)


@dataclass(frozen=True)
class HistoryEntry:
    """One finished comparison, as the session's history table and plot show it."""

    run: int
    model: str
    stack: str
    evidence: str
    end_to_end: Ratio | None
    denoising: Ratio | None
    psnr_db: float | None
    ssim: float | None
    memory_change: str
    baseline_cached: bool

    def row(self) -> list[Any]:
        def rounded(value: float | None, digits: int) -> Any:
            return None if value is None else round(value, digits)

        return [
            self.run,
            self.model,
            self.stack,
            self.evidence,
            "n/a" if self.end_to_end is None else self.end_to_end.short(),
            "n/a" if self.denoising is None else self.denoising.short(),
            rounded(self.psnr_db, 2),
            rounded(self.ssim, 4),
            self.memory_change,
            "from cache" if self.baseline_cached else "made",
        ]

    def point(self) -> dict[str, Any] | None:
        """The run on the speedup / fidelity chart (None without both figures)."""
        if self.end_to_end is None or self.psnr_db is None:
            return None
        ratio = self.end_to_end
        return {
            "run": self.run,
            "PSNR vs baseline (dB)": self.psnr_db,
            PLOT_SPEEDUP: round(ratio.value, 4),
            "interval": "n/a" if not ratio.has_interval else f"{ratio.low:.2f}-{ratio.high:.2f}",
            "verdict": ratio.verdict.value,
            "methods": self.stack,
            "model": self.model,
        }


HISTORY_COLUMNS = ("run", "model", "methods", "what they did", "end-to-end", "denoising", "PSNR dB", "SSIM",
                   "peak memory change", "baseline video")
PLOT_COLUMNS = ("run", "PSNR vs baseline (dB)", PLOT_SPEEDUP, "interval", "verdict", "methods", "model")


def _memory_change(result: ComparisonResult) -> str:
    if result.timing is None or not result.timing.memory:
        return "n/a"
    figures = result.timing.memory[0]  # the whole call: what a user's GPU must hold
    change = figures.change_bytes
    if change is None:
        return "n/a"
    if not figures.comparable:
        return "not comparable (cached baseline)"
    return "within noise" if figures.within_noise else f"{change / 2**20:+.1f} MiB"


def history_entry(result: ComparisonResult, run: int) -> HistoryEntry:
    fid = result.fidelity
    # Identical videos have infinite PSNR: the table shows them at the cap (its cells must be JSON);
    # the speedup/fidelity chart leaves them out.
    psnr = None if fid is None else min(fid.psnr_mean, PSNR_CAP_DB)
    evidence = "; ".join(f"{m.method}: " + ", ".join(f"{k} {v}" for k, v in m.report.summary.items() if k != "settings")
                         for m in result.methods)
    return HistoryEntry(
        run=run,
        model=result.settings.preset,
        stack=result.stack,
        evidence=evidence,
        end_to_end=result.speedup("end_to_end"),
        denoising=result.speedup("denoising"),
        psnr_db=psnr,
        ssim=None if fid is None else fid.ssim_mean,
        memory_change=_memory_change(result),
        baseline_cached=result.baseline_reused,
    )


@dataclass(frozen=True)
class ComparisonView:
    """What the page shows of one comparison: small and picklable (no frames), so it can cross
    the process boundary of a ZeroGPU worker."""

    files: dict[str, str]
    rows: list[tuple[str, str, str, str, str]]
    environment: str
    notes: tuple[str, ...]
    warnings: tuple[str, ...]
    error: str | None
    entry: HistoryEntry | None  # None when the comparison failed


def comparison_view(result: ComparisonResult) -> ComparisonView:
    notes = list(result.notes)
    protocol = protocol_line(result)
    if protocol:
        notes.insert(0, protocol)
    return ComparisonView(
        files=dict(result.files),
        rows=metric_rows(result),
        environment=environment_line(result.environment),
        notes=tuple(notes),
        warnings=result.warnings,
        error=result.error,
        entry=history_entry(result, run=0) if result.ok else None,
    )


def gpu_estimate(requests: list[ComparisonRequest]) -> GpuEstimate:
    """GPU time for a list of requests that share a baseline (one comparison or one sweep);
    validates the first request (a :class:`RequestError` names the broken rule)."""
    preset = get_preset(requests[0].preset)
    settings, _ = resolve(requests[0], preset)
    calibrates = any(method.prepare is not None for request in requests for method in check_stack(request.methods))
    return estimate_gpu_time(preset, settings.steps, settings.frames, settings.height, settings.width,
                             settings.rounds, points=len(requests), warmup_steps=settings.warmup_steps,
                             calibrates=calibrates)
