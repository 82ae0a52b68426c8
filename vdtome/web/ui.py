"""The web app's logic that does not need Gradio: the form, its values to a request, history, sweeps.

The form is declared here once, from the method registry: ``app.py`` builds one widget per field
and wires the events by these names, so a new method never edits the app. What a user can type is
checked here (and tested) with messages that name the field and the rule.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from vdtome.core.presets import DATA_DIR, ModelPreset, get_preset, load_prompts
from vdtome.core.validation import PLAIN_DECIMAL, RequestError, boolean, decimal_list, shown
from vdtome.engine.fidelity import PSNR_CAP_DB
from vdtome.engine.report import metric_rows, protocol_line
from vdtome.engine.request import ComparisonResult, ResolvedSettings
from vdtome.engine.video_io import difference_scale
from vdtome.measure.environment import environment_line
from vdtome.measure.protocol import PhaseFigures
from vdtome.measure.stats import Ratio, Verdict, speed_phrase
from vdtome.methods import METHODS, FormField, Method, check_stack, field_owner, method_of, preset_form_defaults

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


# The endpoints' parameter order as published (vdtome/data/api_parameters.json): data, not code, so
# no method's place in it is assumed here.
API_PARAMETERS = DATA_DIR / "api_parameters.json"


@functools.cache
def _published(endpoint: str) -> tuple[tuple[str, ...], int]:
    spec = json.loads(API_PARAMETERS.read_text(encoding="utf-8"))[endpoint]
    return tuple(spec["parameters"]), int(spec["required"])


def api_fields(sweep: bool) -> tuple[str, ...]:
    """The endpoints' parameters in order: the published order, then each method registered since
    (its switch, then its fields), in registration order. Only ever appended to, so positional API
    calls written before keep working; a published parameter that no longer exists is an error."""
    published, _ = _published("sweep" if sweep else "compare")
    current = [*REQUEST_FIELDS, CUSTOM_MODEL, *((SWEEP_VALUES, SWEEP_FIELD) if sweep else ())]
    for method in METHODS.values():
        current += [method.enable_field, *(f.name for f in method.fields)]
    gone = sorted(set(published) - set(current))
    if gone:
        raise RuntimeError(f"published API parameters {gone} are gone; parameters may only be appended")
    return (*published, *(name for name in current if name not in published))


def appended_from(sweep: bool) -> int:
    """How many of :func:`api_fields` a client must send (those of the first published order); the
    ones after take their defaults when left out."""
    return _published("sweep" if sweep else "compare")[1]


def method_defaults(preset: ModelPreset | None = None) -> dict[str, Any]:
    """Every method field's default (``preset``'s where it sets one, see ``method_defaults`` in
    vdtome/data/presets/models.json) and every switch (on for methods on by default)."""
    values: dict[str, Any] = {}
    for method in METHODS.values():
        values[method.enable_field] = method.on_by_default
        values.update(method.form_defaults() if preset is None else preset_form_defaults(method, preset))
    return values | {SWEEP_FIELD: sweep_choices()[0][1]}


def _preset_or_none(name: Any) -> ModelPreset | None:
    try:
        return get_preset(name)
    except (KeyError, ValueError):
        return None


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


def sweep_label(name: Any) -> str:
    """"token merging (ToMe) · merge ratio": what a sweep varies, for its curve's name."""
    method, form_field = _sweepable(name)
    return f"{method.label} · {form_field.label.lower()}"


def _sweepable(name: Any) -> tuple[Method, FormField]:
    owner = field_owner(name)
    if owner is not None and owner[1].sweepable:
        return owner
    names = ", ".join(name for _, name in sweep_choices())
    raise RequestError(f"sweep field must be a sweepable field ({names}), got {name!r}", SWEEP_FIELD)


def sweep_forms(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The form's values of every point of a sweep, in ascending order of the swept value."""
    method, form_field = _sweepable(values.get(SWEEP_FIELD, "ratio"))
    if not boolean(f"use {method.label}", values.get(method.enable_field, method.on_by_default), method.enable_field):
        raise RequestError(f"the sweep varies {form_field.label.lower()} of {method.label}, which is switched off",
                           SWEEP_FIELD)
    numbers = sorted(decimal_list("sweep values", values.get(SWEEP_VALUES), SWEEP_VALUES, MAX_SWEEP_POINTS))
    return [{**values, form_field.name: int(n) if form_field.kind == "integer" and float(n).is_integer() else n}
            for n in numbers]


def sweep_stacks(values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """One stack per value of the swept field, in ascending order (each checked by its method's
    rules: a value a method refuses is refused naming the sweep and the rule)."""
    method, form_field = _sweepable(values.get(SWEEP_FIELD, "ratio"))
    stacks = []
    for point in sweep_forms(values):
        try:
            stacks.append(stack_from_form(point))
        except RequestError as error:
            raise RequestError(f"sweep value {point[form_field.name]:g}: {error}", SWEEP_VALUES) from None
    return stacks


def form_values(settings: ResolvedSettings, overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The form that reproduces a comparison: its request fields, every method's switch, and
    every field at its default but for ``overrides`` (method name -> form field -> value) of the
    methods switched on (as the command line's ``--method NAME:field=value`` gives them)."""
    form: dict[str, Any] = {name: getattr(settings, name) for name in REQUEST_FIELDS}
    preset = _preset_or_none(settings.preset)
    for method in METHODS.values():
        form[method.enable_field] = method.name in overrides
        defaults = method.form_defaults() if preset is None else preset_form_defaults(method, preset)
        form.update({name: list(v) if isinstance(v, tuple) else v for name, v in defaults.items()})
    for name, fields in overrides.items():
        form.update({key: list(v) if isinstance(v, (tuple, frozenset)) else v for key, v in fields.items()})
    return form


def recipe_form(recipe: Any) -> dict[str, Any]:
    """The form's values that run a recipe (:mod:`vdtome.methods.recipe`): its preset and the size,
    steps and guidance it was tuned at, its methods switched on with every field, the others off."""
    from vdtome.methods.recipe import CALL_SETTINGS

    values: dict[str, Any] = {"preset": recipe.preset, **{name: getattr(recipe, name) for name in CALL_SETTINGS}}
    on = dict(recipe.stack)
    for method in METHODS.values():
        values[method.enable_field] = method.name in on
    for name, fields in on.items():
        values.update({key: widget_value(value) for key, value in fields.items()})
    return values


def panel_title(method: Method, values: Mapping[str, Any]) -> str:
    """A method's group title: whether it is on and its settings, so a folded group still says
    what will run ("token merging (ToMe) · on · ratio 0.5 stride 1x2x2"); settings the method
    refuses are named as such."""
    if not values.get(method.enable_field):
        return f"{method.label} · off"
    try:
        return f"{method.label} · on · {method.summary(method.from_form(values))}"
    except RequestError as error:
        return f"{method.label} · on · not runnable: {error}"


def acceleration_title(values: Mapping[str, Any]) -> str:
    """The title of the section that holds every method: what will run, so that folded (as it starts,
    keeping Run near the top on a phone) it still says so."""
    on = []
    for method in METHODS.values():
        if values.get(method.enable_field) is True:
            try:
                on.append(f"{method.label} {method.summary(method.from_form(values))}")
            except RequestError:
                on.append(f"{method.label} (not runnable: open to see why)")
    return "Acceleration · " + (" + ".join(on) if on else "nothing switched on")


def field_bound(form_field: FormField, values: Mapping[str, Any]) -> tuple[float, str] | None:
    """A field's largest valid value for the other fields' current values (None: its fixed
    maximum applies, or those values are not valid yet)."""
    if form_field.bound is None:
        return None
    try:
        return form_field.bound({name: values[name] for name in form_field.bound_by})
    except (KeyError, TypeError, ValueError, ArithmeticError):
        return None


def preset_choice_label(preset: ModelPreset, has_gpu: bool) -> str:
    if preset.requires_gpu and not has_gpu:
        return f"{preset.label} (unavailable: needs a GPU)"
    return preset.label


def preset_prompts(preset: ModelPreset) -> list[str]:
    """The example prompts for a preset: the set it was trained on, else the general set."""
    return load_prompts(preset.prompts or "default")


def preset_line(preset: ModelPreset, has_gpu: bool) -> str:
    """One line under the model picker (a phone shows the form before the details): whether it can
    run here and its input rules; the rest is folded (:func:`preset_info`)."""
    unavailable = "**Unavailable here: this machine has no GPU.** " if preset.requires_gpu and not has_gpu else ""
    return f"{unavailable}Inputs: {preset.constraints.describe()}."


def preset_info(preset: ModelPreset, has_gpu: bool) -> str:
    """Markdown folded under the model picker: hardware note and the model's input rules."""
    lines = [f"**{preset.label}**", f"Hardware: {preset.hardware}", f"Inputs: {preset.constraints.describe()}.",
             f"Timing rounds by default: {preset.timing_rounds}" + (
                 f" (after the first, {preset.timing_steps} steps each when every step of the stack costs alike)."
                 if preset.timing_steps else ".")]
    if preset.requires_gpu and not has_gpu:
        lines.insert(1, "**Unavailable here: this machine has no GPU.**")
    if preset.local:
        lines.append(f"Weights: the folder `{Path(preset.local).name}` shipped with vdtome (trained on this kind of "
                     "CPU by `python -m vdtome.offline.train`).")
    elif preset.hub_id:
        lines.append(f"Weights: `{preset.hub_id}` (loaded from the local Hugging Face cache or the hub).")
    return "\n\n".join(lines)


@dataclass(frozen=True)
class HistoryEntry:
    """One finished comparison, as the session's history table and plot show it."""

    run: int
    model: str
    prompt: str
    seed: int
    stack: str
    evidence: str
    end_to_end: Ratio | None
    denoising: Ratio | None
    psnr_db: float | None
    ssim: float | None
    memory_change: str
    baseline_cached: bool
    size: str = ""  # "17x128x128": frames x height x width (only runs of one size compare)

    def row(self) -> list[Any]:
        """The table's cells, in :data:`HISTORY_COLUMNS` order: the verdicts and fidelity first."""
        def rounded(value: float | None, digits: int) -> Any:
            return None if value is None else round(value, digits)

        cells = {
            "run": self.run,
            "end-to-end": "n/a" if self.end_to_end is None else self.end_to_end.short(),
            "denoising": "n/a" if self.denoising is None else self.denoising.short(),
            "PSNR dB": rounded(self.psnr_db, 2),
            "SSIM": rounded(self.ssim, 4),
            "methods": self.stack,
            "model": self.model,
            "size": self.size,
            "prompt": self.prompt,
            "seed": self.seed,
            "what they did": self.evidence,
            "peak memory change": self.memory_change,
            "baseline video": "from cache" if self.baseline_cached else "made",
        }
        return [cells[column] for column in HISTORY_COLUMNS]

    def figures(self) -> dict[str, Any]:
        """The speedups as numbers (value, interval, verdict) for the CSV export."""
        return {name: _ratio_numbers(ratio) for name, ratio in (("denoising", self.denoising),
                                                                ("end_to_end", self.end_to_end))}

    def point(self) -> dict[str, Any] | None:
        """The run on the speedup / fidelity chart (None without both figures). ``claim``: the
        verdict in the words of the chart's legend; only tested verdicts are drawn as claims."""
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
            "size": self.size,
            "low": None if not ratio.has_interval else round(ratio.low, 4),
            "high": None if not ratio.has_interval else round(ratio.high, 4),
            "claim": CLAIMS[ratio.verdict],
        }


#: The chart legend's words for each verdict: tested or not is what a reader must see first.
CLAIMS = {
    Verdict.FASTER: "faster (interval above 1)",
    Verdict.SLOWER: "slower (interval below 1)",
    Verdict.NO_DIFFERENCE: "no significant difference",
    Verdict.TOO_FEW_REPEATS: "not tested (too few rounds)",
    Verdict.DID_NOTHING: "did nothing (no claim)",
}


def _ratio_numbers(ratio: Ratio | None) -> dict[str, Any]:
    if ratio is None:
        return {"speedup": None, "low": None, "high": None, "verdict": "not measured"}
    return {"speedup": round(ratio.value, 4), "low": None if ratio.low is None else round(ratio.low, 4),
            "high": None if ratio.high is None else round(ratio.high, 4), "verdict": ratio.verdict.value}


# What a reader compares first (verdicts, fidelity, what ran, on which model and size), then the rest.
HISTORY_COLUMNS = ("run", "end-to-end", "denoising", "PSNR dB", "SSIM", "methods", "model", "size", "prompt", "seed",
                   "what they did", "peak memory change", "baseline video")
# The columns of histories kept in browsers before the size column (moved into the order above when read).
EARLIER_HISTORY_COLUMNS = ("run", "model", "prompt", "seed", "methods", "what they did", "end-to-end", "denoising",
                           "PSNR dB", "SSIM", "peak memory change", "baseline video")
HISTORY_METHODS = HISTORY_COLUMNS.index("methods")
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
        prompt=result.settings.prompt,
        seed=result.settings.seed,
        stack=result.stack,
        evidence=evidence,
        end_to_end=result.speedup("end_to_end"),
        denoising=result.speedup("denoising"),
        psnr_db=psnr,
        ssim=None if fid is None else fid.ssim_mean,
        memory_change=_memory_change(result),
        baseline_cached=result.baseline_reused,
        size=run_size(result.settings.frames, result.settings.height, result.settings.width),
    )


def run_size(frames: Any, height: Any, width: Any) -> str:
    """A run's size as the history shows it: frames x height x width."""
    return f"{frames}x{height}x{width}"


@dataclass(frozen=True)
class Card:
    """One headline figure above the player. ``tone``: "better", "worse", "neutral" (within noise,
    or a figure with no better direction), "untested" (no verdict: drawn plain and grey) or
    "unreliable" (a verdict taken on a busy machine)."""

    title: str
    value: str
    detail: str
    tone: str


def _speed_card(title: str, figures: PhaseFigures | None, busy: bool = False) -> Card:
    """A speedup with the two medians it compares (the same figures the players' captions show).
    Only a tested verdict is coloured; an untested figure or a method that did nothing is grey,
    in plain type, and says so first; a verdict taken on a busy machine says it is unreliable in
    its own text, in amber, never green or red."""
    ratio = None if figures is None else figures.ratio
    if ratio is None:
        return Card(title, "n/a", "not measured", "neutral")
    medians = ""
    if figures.baseline_ms is not None and figures.accelerated_ms is not None:
        medians = f"; medians {figures.median_text('baseline')} → {figures.median_text('accelerated')}"
    if busy and (ratio.verdict.claims_change or ratio.verdict is Verdict.NO_DIFFERENCE):
        return Card(title, f"unreliable: {ratio.short()}", f"timed on a busy machine; {ratio.interval_text()}{medians}",
                    "unreliable")
    if ratio.verdict.claims_change:
        return Card(title, speed_phrase(ratio.value), ratio.interval_text() + medians,
                    "better" if ratio.verdict is Verdict.FASTER else "worse")
    if ratio.verdict is Verdict.TOO_FEW_REPEATS:
        return Card(title, "not tested", f"{ratio.interval_text()}; measured ratio {ratio.value:.2f}{medians}",
                    "untested")
    if ratio.verdict is Verdict.DID_NOTHING:
        return Card(title, "did nothing", f"no speed claim: {ratio.no_claim}; measured ratio {ratio.value:.2f}{medians}",
                    "untested")
    return Card(title, ratio.short(), f"median {speed_phrase(ratio.value)}; {ratio.interval_text()}{medians}", "neutral")


def _fidelity_card(result: ComparisonResult) -> Card:
    fid = result.fidelity
    if fid is None:
        return Card("Fidelity to the baseline", "n/a", "no pair of videos to compare", "neutral")
    if fid.identical:
        return Card("Fidelity to the baseline", "identical", "every pixel of every frame equal", "neutral")
    worst = min(range(len(fid.psnr)), key=fid.psnr.__getitem__)
    psnr = f">= {PSNR_CAP_DB:.0f} dB" if fid.psnr_mean >= PSNR_CAP_DB else f"{fid.psnr_mean:.1f} dB"
    return Card("Fidelity to the baseline", f"PSNR {psnr} · SSIM {fid.ssim_mean:.3f}",
                f"worst frame {worst}: {fid.psnr[worst]:.1f} dB", "neutral")


def _memory_card(result: ComparisonResult) -> Card:
    title = "Peak memory"
    if result.timing is None or not result.timing.memory:
        return Card(title, "n/a", "not measured", "neutral")
    figures = result.timing.memory[0]
    change = figures.change_bytes
    if change is None:
        return Card(title, "n/a", f"{figures.kind}, {figures.scope}", "neutral")
    detail = f"{figures.kind}, {figures.scope}; baseline {figures.baseline / 2**20:.1f} MiB"
    if result.memory_plan is not None:
        plan = result.memory_plan
        detail += (f"; the memory plan estimated {plan.baseline.peak_bytes / 2**20:.1f} -> "
                   f"{plan.accelerated.peak_bytes / 2**20:.1f} MiB with the weights")
    if not figures.comparable:
        return Card(title, "not comparable", "the baseline ran in another request; " + detail, "neutral")
    if not figures.exact and (figures.within_noise or figures.noise_bytes is None):
        return Card(title, "within noise", f"{change / 2**20:+.1f} MiB; " + detail, "neutral")
    tone = "neutral" if change == 0 else "better" if change < 0 else "worse"
    return Card(title, f"{change / 2**20:+.1f} MiB", detail, tone)


def headline_cards(result: ComparisonResult) -> tuple[Card, ...]:
    """Denoising and end-to-end speedup (with their interval), fidelity, peak memory change."""
    timing = result.timing
    busy = timing is not None and timing.busy_headline is not None
    return (_speed_card("Denoising", None if timing is None else timing.denoising, busy),
            _speed_card("End to end (projected)", None if timing is None else timing.end_to_end, busy),
            _fidelity_card(result), _memory_card(result))


def latency_breakdown(result: ComparisonResult) -> list[tuple[str, str, float]]:
    """(side, phase, seconds): median phase times of each side in this request, for the chart. A
    denoising loop timed in short rounds is its median step times the full call's steps; a phase
    measured on one side only (the decode of a cached baseline) is drawn on both, as the method
    cannot touch it, and named so."""
    timing = result.timing
    if timing is None:
        return []
    rows = []
    scale = result.settings.steps if timing.denoising.per_step else 1
    for figures, label in ((timing.denoising, "denoising"), *((p, p.label) for p in timing.untouched)):
        times = {side: getattr(figures, f"{side}_ms") for side in ("baseline", "accelerated")}
        if figures.touched or all(ms is not None for ms in times.values()):
            rows += [(side, label, round(ms * scale / 1000, 4)) for side, ms in times.items() if ms is not None]
            continue
        measured = next((ms for ms in times.values() if ms is not None), None)
        if measured is not None:
            rows += [(side, f"{label} (measured on one side; untouched, so equal)", round(measured / 1000, 4))
                     for side in times]
    return rows


def code_snippet(settings: ResolvedSettings, configs: tuple[Any, ...]) -> str:
    """The library call that reproduces a comparison (method fields left at their defaults omitted)."""
    imports = sorted({(type(c).__module__, type(c).__name__) for c in configs})
    lines = ["import vdtome"]
    lines += [f"from {module} import {name}" for module, name in imports]

    def short(config: Any) -> str:
        changed = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
                   if f.init and getattr(config, f.name) != _default_of(f)]
        return f"{type(config).__name__}({', '.join(changed)})"

    stack = ", ".join(short(c) for c in configs) + ("," if len(configs) == 1 else "")
    s = settings
    negative = f"\n    negative_prompt={s.negative_prompt!r}," if s.negative_prompt else ""
    lines += ["", "result = vdtome.compare(vdtome.ComparisonRequest(",
              f"    preset={s.preset!r},", f"    prompt={s.prompt!r},{negative}",
              f"    seed={s.seed}, frames={s.frames}, height={s.height}, width={s.width}, steps={s.steps}, "
              f"guidance={s.guidance!r}, rounds={s.rounds},",
              f"    methods=({stack}),", "))",
              'print(result.speedup("denoising").text(), result.fidelity.psnr_mean, result.files)']
    return "\n".join(lines)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def run_settings(settings: ResolvedSettings, configs: tuple[Any, ...]) -> dict[str, str]:
    """Every setting of a run as text (one CSV column each; the chart's "what differs" tooltip)."""
    s = settings
    values = {"model": s.preset, "prompt": s.prompt, "negative prompt": s.negative_prompt,
              "seed": str(s.seed), "frames": str(s.frames), "size": f"{s.height}x{s.width}", "steps": str(s.steps),
              "guidance": f"{s.guidance:g}", "rounds": str(s.rounds), "timing steps": str(s.round_steps)}
    for config in configs:
        method = method_of(config)
        for f in dataclasses.fields(config):
            if f.init:
                values[f"{method.name}.{f.name}"] = str(getattr(config, f.name))
    return values


@dataclass(frozen=True)
class ComparisonView:
    """What the page shows of one comparison: plain values only (no frames, no Ratio objects), so
    it crosses the process boundary of a ZeroGPU worker and is saved as ``view.json`` beside the
    videos, from which a past run or a shipped example is shown again."""

    files: dict[str, str]
    rows: list[tuple[str, str, str, str, str]]
    environment: str
    notes: tuple[str, ...]
    warnings: tuple[str, ...]
    error: str | None
    cards: tuple[Card, ...] = ()
    latency: tuple[tuple[str, str, float], ...] = ()
    frame_psnr: tuple[float, ...] = ()
    difference_max: float | None = None
    code: str = ""
    title: str = ""  # preset, stack, seed: what the result belongs to
    history: dict[str, Any] | None = None  # the history entry (None when the comparison failed)
    form: dict[str, Any] | None = None  # the form's values that reproduce it (None: not recorded)
    busy: str = ""  # one line: what was busy and what it means (the warnings hold the details)

    def to_json(self) -> str:
        """``files`` as names relative to the folder the view is saved in."""
        data = dataclasses.asdict(self) | {"files": {k: Path(v).name for k, v in self.files.items()}}
        return json.dumps(data, indent=1, allow_nan=False)

    @classmethod
    def load(cls, folder: Path) -> "ComparisonView":
        """The view saved in ``folder`` (its files resolved there; a missing file is left out)."""
        data = json.loads((folder / VIEW_FILE).read_text())
        files = {k: str(folder / name) for k, name in data["files"].items() if (folder / name).exists()}
        return cls.from_dict(data | {"files": files})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ComparisonView":
        """The view from ``dataclasses.asdict`` of one (or its JSON): lists back to tuples, cards typed."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**({k: v for k, v in data.items() if k in known} | {
            "rows": [tuple(r) for r in data["rows"]], "notes": tuple(data["notes"]),
            "warnings": tuple(data["warnings"]), "cards": tuple(Card(**c) for c in data["cards"]),
            "latency": tuple(tuple(r) for r in data["latency"]), "frame_psnr": tuple(data["frame_psnr"])}))

    def save(self) -> None:
        """Write ``view.json`` into the folder of the result's files."""
        if "json" in self.files:
            (Path(self.files["json"]).parent / VIEW_FILE).write_text(self.to_json())


VIEW_FILE = "view.json"


def comparison_view(result: ComparisonResult, configs: tuple[Any, ...] = ()) -> ComparisonView:
    """The page's view of a result; ``configs``: the stack as requested (for the code snippet)."""
    notes = list(result.notes)
    protocol = protocol_line(result)
    if protocol:
        notes.insert(0, protocol)
    fid = result.fidelity
    difference_max = None
    if fid is not None and result.baseline is not None and result.accelerated is not None:
        difference_max = difference_scale(result.baseline.frames, result.accelerated.frames)
    entry = None
    if result.ok:
        entry = history_record(history_entry(result, run=0), run_settings(result.settings, configs))
    return ComparisonView(
        files=dict(result.files),
        rows=metric_rows(result),
        environment=environment_line(result.environment),
        notes=tuple(notes),
        warnings=result.warnings,
        error=result.error,
        cards=headline_cards(result),
        latency=tuple(latency_breakdown(result)),
        frame_psnr=() if fid is None else tuple(round(min(p, PSNR_CAP_DB), 3) for p in fid.psnr),
        difference_max=difference_max,
        code=code_snippet(result.settings, configs) if configs else "",
        title=f"{result.settings.preset} · {result.stack} · seed {result.settings.seed}",
        history=entry,
        busy="" if result.timing is None else result.timing.busy_headline or "",
    )


def history_record(entry: HistoryEntry, settings: dict[str, str], series: str | None = None) -> dict[str, Any]:
    """A history entry as the browser keeps it (plain JSON)."""
    return {"row": entry.row(), "point": entry.point(), "figures": entry.figures(), "settings": settings,
            "series": series, "folder": None}


def history_export(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history as CSV rows: the table's columns (the full prompt), each speedup as numbers
    (median, interval low and high, verdict), then one column per setting of any run."""
    setting_names = list(dict.fromkeys(name for entry in history for name in entry.get("settings", {})
                                       if name not in ("model", "prompt", "seed")))
    rows = []
    for entry in history:
        row = dict(zip(HISTORY_COLUMNS, entry["row"]))
        for phase in ("denoising", "end_to_end"):
            column = phase.replace("_", "-")
            row.pop(column, None)  # the table's phrase: replaced by the numbers
            numbers = (entry.get("figures") or {}).get(phase) or {}
            for key in ("speedup", "low", "high", "verdict"):
                row[f"{column} {key}"] = numbers.get(key)
        row["series"] = entry.get("series") or ""
        settings = entry.get("settings", {})
        row.update({name: settings.get(name, "") for name in setting_names})
        rows.append(row)
    return rows


# ---- a link that restores the form -----------------------------------------------------------------

SHARED_REQUEST_FIELDS = REQUEST_FIELDS  # every request field travels in a link; method fields when changed


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def settings_query(values: Mapping[str, Any]) -> str:
    """The form as a query string ("?preset=tiny-wan&prompt=...&ratio=0.5"): the request's fields,
    and each method's switch and fields where they differ from their defaults on the form's preset."""
    defaults = method_defaults(_preset_or_none(values.get("preset")))
    pairs = [(name, values[name]) for name in SHARED_REQUEST_FIELDS if values.get(name) not in (None, "")]
    pairs += [(name, value) for name, value in values.items()
              if name in defaults and name != SWEEP_FIELD and value is not None and _as_text(value) != _as_text(defaults[name])]
    return "?" + urlencode([(name, _as_text(value)) for name, value in pairs])


NUMBER_FIELDS = ("seed", "frames", "height", "width", "steps", "guidance", "rounds")


def form_targets(values: dict[str, Any], problems: list[str], presets: Mapping[str, ModelPreset], default: str,
                 fields: tuple[str, ...]) -> tuple[ModelPreset, dict[str, Any]]:
    """Where a restored link (or a shown run) takes the form: the preset it will show and the new
    value of each of ``fields`` that changes (the value given, else the new preset's default when
    the preset changes; a field left out stays as it is). An unknown preset is dropped and named in
    ``problems``, never guessed."""
    name = values.get("preset")
    if name is not None and name not in presets:
        problems.append(f"preset: no preset named {shown(name)}")
        values = {key: value for key, value in values.items() if key != "preset"}
    preset = presets[values.get("preset", default)]
    defaults = {"frames": preset.num_frames, "height": preset.height, "width": preset.width,
                "steps": preset.num_inference_steps, "guidance": preset.guidance_scale, "rounds": preset.timing_rounds,
                **method_defaults(preset)}
    targets = {}
    for field in fields:
        if field in values:
            targets[field] = widget_value(values[field])
        elif "preset" in values and field in defaults:
            targets[field] = widget_value(defaults[field])
    return preset, targets


def widget_value(value: Any) -> Any:
    """A value as a widget holds it: a multiple choice as a list (Gradio reads a tuple as one choice)."""
    return list(value) if isinstance(value, (tuple, frozenset, set)) else value


def settings_from_query(params: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Form values from a link's query parameters, and what could not be used (named, with the
    rule): a value the form cannot hold is left at the form's value rather than changed."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    fields = {f.name: f for m in METHODS.values() for f in m.fields}
    switches = {m.enable_field for m in METHODS.values()}
    for name, text in params.items():
        try:
            if name in ("preset", "prompt", "negative_prompt"):
                values[name] = text
            elif name in NUMBER_FIELDS:
                if not PLAIN_DECIMAL.fullmatch(text):
                    raise RequestError(f"must be a plain decimal number, got {text!r}", name)
                number = float(text)
                values[name] = int(number) if number.is_integer() else number
            elif name in switches:
                if text not in ("true", "false"):
                    raise RequestError(f"must be true or false, got {text!r}", name)
                values[name] = text == "true"
            elif name in fields:
                parsed = fields[name].from_text(text)
                values[name] = list(parsed) if isinstance(parsed, (tuple, frozenset, set)) else parsed
            else:
                problems.append(f"{name}: not a setting of this page")
        except (ValueError, RequestError) as error:
            problems.append(f"{name}: {error}")
    return values, problems
