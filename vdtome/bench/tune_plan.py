"""What a tune is asked (:class:`TunePlan`, its :class:`Floor` s) and what it finds (trials, the
validation of its finalists, the outcome), apart from the study that runs it (:mod:`vdtome.bench.tune`)
so that its report (:mod:`vdtome.bench.tune_report`), the app's gate and the command line read them
without importing Optuna."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from vdtome.core.presets import ModelPreset, get_preset, load_prompts, prompt_sets
from vdtome.core.validation import RequestError, whole_number
from vdtome.measure.stats import pareto_front

JUDGE = "judge"
FLOOR_MEASURES = ("psnr", "ssim", JUDGE)
MAX_COUNT = 100_000  # trials, prompts or finalists a plan may ask for
SLACK = 1e-9  # a shortfall this small is float noise: the floor is met


# ---- what a tune is asked -------------------------------------------------------------------------


@dataclass(frozen=True)
class Floor:
    """A quality the recipe must keep on every prompt: ``psnr`` (dB) or ``ssim`` to the baseline's
    video at least ``value``; ``judge`` (shapes models): no clip whose colour and direction the baseline
    keeps is lost, less ``value`` clips of tolerance. Counted clip by clip, not as totals: a clip the
    accelerated run happens to fix never pays for one it broke."""

    measure: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Floor:
        measure, sep, value = str(text).strip().partition("=")
        measure = measure.strip().lower()
        if measure not in FLOOR_MEASURES:
            raise RequestError(f"floor {text!r}: the measure must be one of psnr=DB, ssim=X, judge or judge=CLIPS",
                               "floor")
        if not sep:
            if measure != JUDGE:
                example = "24" if measure == "psnr" else "0.8"
                raise RequestError(f"floor {text!r}: give its value, e.g. {measure}={example}", "floor")
            return cls(JUDGE, 0.0)
        try:
            number = float(value)
        except ValueError:
            raise RequestError(f"floor {text!r}: {value!r} is not a number", "floor") from None
        limits = {"psnr": (0.0, 100.0), "ssim": (-1.0, 1.0), JUDGE: (0.0, 100.0)}[measure]
        if not math.isfinite(number) or not limits[0] <= number <= limits[1]:
            raise RequestError(f"floor {text!r}: {measure} must be between {limits[0]:g} and {limits[1]:g}", "floor")
        if measure == JUDGE and number != int(number):
            raise RequestError(f"floor {text!r}: the judge's tolerance is a whole number of clips", "floor")
        return cls(measure, number)

    def text(self) -> str:
        if self.measure == JUDGE:
            return "judge" if not self.value else f"judge={self.value:g}"
        return f"{self.measure}={self.value:g}"

    def describe(self) -> str:
        if self.measure == JUDGE:
            tolerance = f" less {self.value:g} clip{'s' if self.value != 1 else ''}" if self.value else ""
            return f"no clip whose colour and direction the baseline keeps is lost{tolerance}"
        return f"{'PSNR' if self.measure == 'psnr' else 'SSIM'} to the baseline >= {self.value:g}" + \
            (" dB" if self.measure == "psnr" else "") + " on every prompt"

    def shortfall(self, quality: Quality) -> float:
        """How far ``quality`` is below this floor (<= 0: met): the constraint Optuna is given."""
        if self.measure == "psnr":
            return self.value - min(quality.psnr)
        if self.measure == "ssim":
            return self.value - min(quality.ssim)
        return quality.lost - self.value

    def broken(self, quality: Quality) -> bool:
        """Whether ``quality`` is below this floor. On the first prompts of a run it stays below
        whatever the others give (a PSNR or SSIM under it on one prompt; a lost clip stays lost):
        the run can stop there."""
        return self.shortfall(quality) > SLACK


@dataclass(frozen=True)
class Quality:
    """The accelerated videos' quality on some prompts: PSNR and SSIM (means over frames) to the
    baseline video, and per prompt whether the judge kept the prompt (shapes models; else empty)."""

    psnr: tuple[float, ...]
    ssim: tuple[float, ...]
    kept: tuple[bool, ...] = ()
    baseline_kept: tuple[bool, ...] = ()

    @property
    def psnr_mean(self) -> float:
        return statistics.fmean(self.psnr)

    @property
    def lost(self) -> int:
        """Clips whose prompt the baseline keeps and the accelerated run loses."""
        return sum(base and not kept for kept, base in zip(self.kept, self.baseline_kept))

    def kept_text(self) -> str:
        if not self.kept:
            return ""
        return (f"{sum(self.kept)}/{len(self.kept)} (baseline {sum(self.baseline_kept)}/{len(self.baseline_kept)}"
                f", {self.lost} lost)")


@dataclass(frozen=True)
class TunePlan:
    """What to tune. ``prompts``: a prompt set (default: the preset's tuning set, e.g. shapes-tuning,
    else its own); its first ``tuning_prompts`` tune, the next ``validation_prompts`` validate (disjoint,
    both recorded). ``trials`` and / or ``minutes`` bound the study (trials that ran; minutes of
    their running); ``finalists``: Pareto-front trials re-run with ``rounds`` timing rounds (default:
    the preset's) on the validation prompts; ``require``: methods in every stack tried."""

    preset: str
    floors: tuple[Floor, ...]
    methods: tuple[str, ...] | None = None
    trials: int | None = None
    minutes: float | None = None
    prompts: str | None = None
    tuning_prompts: int = 2
    validation_prompts: int = 4
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    seed: int = 0
    finalists: int = 3
    rounds: int | None = None
    require: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        preset = self.model()
        if not self.floors:
            raise RequestError("give at least one floor (--floor psnr=24, --floor ssim=0.8, --floor judge)", "floor")
        measures = [f.measure for f in self.floors]
        if len(set(measures)) != len(measures):
            raise RequestError(f"one floor per measure, got {', '.join(f.text() for f in self.floors)}", "floor")
        if JUDGE in measures and not judged(preset):
            raise RequestError(f"the judge reads the shapes models' prompts; {preset.name} is not one: "
                               "use a psnr or ssim floor", "floor")
        if self.trials is None and self.minutes is None:
            raise RequestError("give a budget: --trials N and / or --minutes M", "trials")
        if self.trials is not None:
            object.__setattr__(self, "trials", whole_number("trials", self.trials, 1, MAX_COUNT, "trials"))
        if self.minutes is not None and not (isinstance(self.minutes, (int, float)) and 0 < self.minutes <= 10_000):
            raise RequestError(f"minutes must be above 0 (and at most 10000), got {self.minutes!r}", "minutes")
        for name in ("tuning_prompts", "validation_prompts", "finalists"):
            value = whole_number(name.replace("_", " "), getattr(self, name), 1, MAX_COUNT, name)
            object.__setattr__(self, name, value)
        available = self.prompt_list()
        wanted = self.tuning_prompts + self.validation_prompts
        if len(available) < wanted:
            raise RequestError(f"prompt set {self.prompt_set()!r} has {len(available)} prompts; {self.tuning_prompts} "
                               f"tuning + {self.validation_prompts} validation prompts need {wanted}", "prompts")
        self.space()  # the methods named: each one the preset takes, the required among them

    def space(self):
        from vdtome.methods.tuning import search_space

        return search_space(self.model(), self.methods, self.settings().steps, self.require)

    def model(self) -> ModelPreset:
        try:
            return get_preset(self.preset)
        except KeyError as error:
            raise RequestError(str(error.args[0]) if error.args else str(error), "preset") from None

    def prompt_set(self) -> str:
        if self.prompts:
            return self.prompts
        own = self.model().prompts or "default"
        return f"{own}-tuning" if f"{own}-tuning" in prompt_sets() else own

    def prompt_list(self) -> list[str]:
        try:
            return load_prompts(self.prompt_set())
        except Exception as error:  # UnknownPresetError: the set's name
            raise RequestError(str(error.args[0]) if error.args else str(error), "prompts") from None

    def tuning(self) -> tuple[str, ...]:
        return tuple(self.prompt_list()[:self.tuning_prompts])

    def validation(self) -> tuple[str, ...]:
        return tuple(self.prompt_list()[self.tuning_prompts:self.tuning_prompts + self.validation_prompts])

    def request(self, prompt: str, configs: tuple[Any, ...], rounds: int | None):
        from vdtome.engine.request import ComparisonRequest

        return ComparisonRequest(preset=self.preset, prompt=prompt, seed=self.seed, frames=self.frames,
                                 height=self.height, width=self.width, steps=self.steps, methods=configs,
                                 rounds=rounds, snap=False)

    def settings(self):
        """The call settings every trial and validation run at (a size the model cannot take is refused)."""
        from vdtome.engine.request import resolve

        return resolve(self.request(self.prompt_list()[0], (), 1), self.model())[0]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["floors"] = [f.text() for f in self.floors]
        data["methods"] = None if self.methods is None else list(self.methods)
        data["require"] = list(self.require)
        data["prompt_set"] = self.prompt_set()
        return data


def judged(preset: ModelPreset) -> bool:
    """Whether the judge can read this preset's videos (the shapes models' prompts)."""
    return preset.prompts == "shapes"


# ---- what a tune finds ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialRecord:
    """A trial that ran: its stack (method, form values), the speed estimate (geometric mean of its
    prompts' one-round paired ratios) and the quality on the prompts it ran (fewer than the tuning
    prompts when it stopped early below a floor)."""

    number: int
    stack: tuple[tuple[str, dict[str, Any]], ...]
    label: str
    speedup: float
    quality: Quality
    shortfalls: tuple[float, ...]
    seconds: float
    stopped_early: bool = False
    idle_methods: tuple[str, ...] = ()  # methods of the stack that did nothing in its runs

    @property
    def feasible(self) -> bool:
        return not self.stopped_early and not self.idle_methods and all(s <= SLACK for s in self.shortfalls)


@dataclass(frozen=True)
class PromptFigures:
    """One validation comparison (the full protocol) of a finalist on one prompt."""

    prompt: str
    speedup: float
    low: float | None
    high: float | None
    verdict: str
    end_to_end: float | None
    psnr: float
    ssim: float
    kept: bool | None
    baseline_kept: bool | None
    busy: bool


@dataclass(frozen=True)
class Finalist:
    """A front trial on the validation prompts (``of`` of them; fewer run when it fell under a floor)."""

    trial: TrialRecord
    prompts: tuple[PromptFigures, ...]
    floors: tuple[Floor, ...]
    of: int

    @property
    def complete(self) -> bool:
        return len(self.prompts) == self.of

    @property
    def quality(self) -> Quality:
        kept = tuple(p.kept for p in self.prompts if p.kept is not None)
        base = tuple(p.baseline_kept for p in self.prompts if p.baseline_kept is not None)
        return Quality(tuple(p.psnr for p in self.prompts), tuple(p.ssim for p in self.prompts), kept, base)

    @property
    def speedup(self) -> float:
        """The median over the validation prompts of each comparison's median paired ratio."""
        return statistics.median(p.speedup for p in self.prompts)

    @property
    def passes(self) -> bool:
        return self.complete and not any(floor.broken(self.quality) for floor in self.floors)

    def quality_text(self) -> str:
        """Its worst PSNR and, on the shapes models, the clips the judge kept."""
        quality = self.quality
        return f"PSNR >= {min(quality.psnr):.1f} dB" + (f", judge {quality.kept_text()}" if quality.kept else "")

    @property
    def faster_everywhere(self) -> bool:
        """Every validation comparison's interval lies above 1."""
        return all(p.low is not None and p.low > 1.0 for p in self.prompts)

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.trial.number, "stack": self.trial.label, "speedup_median": self.speedup,
                "validation_prompts_run": f"{len(self.prompts)} of {self.of}",
                "faster_on_every_prompt": self.faster_everywhere, "passes_floors": self.passes,
                "psnr_min": min(self.quality.psnr), "psnr_mean": self.quality.psnr_mean,
                "ssim_min": min(self.quality.ssim),
                "judge_kept": self.quality.kept_text() or None,
                "prompts": [asdict(p) for p in self.prompts]}


@dataclass(frozen=True)
class TuneEvent:
    """Progress: a stage's words, trials run of the budget, minutes left, the feasible front's size."""

    message: str
    trials: int
    budget: int | None
    minutes_left: float | None
    front: int
    finished: TrialRecord | None = None  # the trial that just finished, if this event says so


@dataclass(frozen=True)
class TuneOutcome:
    plan: TunePlan
    trials: tuple[TrialRecord, ...]
    idle: int  # draws that ran nothing: refused stacks and repeats of finished trials
    finalists: tuple[Finalist, ...]
    chosen: Finalist | None
    files: dict[str, str]
    message: str
    seconds_per_trial: float | None
    # Trials run, and minutes of them, until the chosen recipe's trial had run (how long the search needed).
    trials_to_chosen: int | None
    environment: Mapping[str, Any] = field(default_factory=dict)
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return self.chosen is not None

    def search_text(self) -> str:
        """How the search went: trials, their mean time, and when the chosen recipe's trial ran."""
        if not self.trials:
            return "no trial ran"
        text = (f"{len(self.trials)} trials, {self.seconds_per_trial:.0f} s each on average "
                f"({sum(r.seconds for r in self.trials) / 60:.1f} min); {self.idle} draws ran nothing (stacks the "
                "rules refuse, repeats of a finished trial)")
        if self.trials_to_chosen is not None:
            minutes = sum(r.seconds for r in self.trials[:self.trials_to_chosen]) / 60
            text += f"; the chosen recipe's trial was the {_ordinal(self.trials_to_chosen)}, after {minutes:.1f} min"
        return text


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def pareto(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """Trials nothing beats on both speed and mean PSNR, faster than the baseline, fastest first."""
    return pareto_front(records, lambda r: r.speedup, lambda r: r.quality.psnr_mean)
