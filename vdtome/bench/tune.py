"""``python -m vdtome tune``: the fastest stack whose quality stays above a floor, found by an Optuna
study over the methods' own form fields (:mod:`vdtome.methods.tuning`), re-validated on prompts the
study never saw, and written as one recipe file (:mod:`vdtome.methods.recipe`).

Cheap first, truthful last:

- A **trial** draws a stack and runs it through the comparison engine on the tuning prompts with
  one timing round (a baseline call and an accelerated call back to back; the baseline video is made
  once per prompt and reused): a paired speed estimate and the accelerated video's PSNR / SSIM to the
  baseline's (and, on the shapes models, whether the judge still reads the prompt's colour and
  direction). A trial already below a floor after one prompt stops there.
- Optuna (multi-objective: denoising speedup and mean PSNR, the floors as constraints) chooses the
  next trial; the study lives in ``DIR/study.db`` (SQLite), so a tune killed at any moment resumes
  with ``--resume``: finished trials are kept, an interrupted one is run again, none repeated.
- The **finalists** (the fastest of the feasible Pareto front) are re-run with the full timing
  protocol (the preset's independent rounds, intervals, verdicts) on the held-out validation
  prompts. The chosen recipe is the fastest finalist whose quality on every validation prompt stays
  above the floor; if none does, the tune says so and shows the closest.

Outputs in ``DIR``: ``recipe.json``, ``trials.csv``, ``report.html`` (the front and every trial),
``validation.jsonl`` (each validation comparison as it finished), ``plan.json``.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vdtome.core.presets import ModelPreset, get_preset, load_prompts, prompt_sets
from vdtome.core.validation import RequestError

STUDY_FILE = "study.db"
STUDY_NAME = "tune"
PLAN_FILE = "plan.json"
RECIPE_FILE = "recipe.json"
TRIALS_FILE = "trials.csv"
VALIDATION_FILE = "validation.jsonl"
REPORT_FILE = "report.html"
#: Trials in a row that ran nothing (a refused stack, a repeat of a finished one) before the tune
#: says the space is exhausted.
MAX_IDLE_DRAWS = 200
JUDGE = "judge"
FLOOR_MEASURES = ("psnr", "ssim", JUDGE)


# ---- what a tune is asked -------------------------------------------------------------------------


@dataclass(frozen=True)
class Floor:
    """A quality the recipe must keep on every prompt: ``psnr`` (dB) or ``ssim`` to the baseline's
    video at least ``value``; ``judge`` (shapes models): the prompt's colour and direction kept in at
    least as many clips as the baseline keeps them, less ``value`` clips of tolerance."""

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
                raise RequestError(f"floor {text!r}: give its value, e.g. {measure}={'24' if measure == 'psnr' else '0.8'}",
                                   "floor")
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
            return f"the prompt's colour and direction kept in as many clips as the baseline keeps them{tolerance}"
        return f"{'PSNR' if self.measure == 'psnr' else 'SSIM'} to the baseline >= {self.value:g}" + \
            (" dB" if self.measure == "psnr" else "") + " on every prompt"

    def shortfall(self, quality: Quality) -> float:
        """How far ``quality`` is below this floor (<= 0: met): the constraint Optuna is given."""
        if self.measure == "psnr":
            return self.value - min(quality.psnr)
        if self.measure == "ssim":
            return self.value - min(quality.ssim)
        return (sum(quality.baseline_kept) - self.value) - sum(quality.kept)


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

    def kept_text(self) -> str:
        if not self.kept:
            return ""
        return f"{sum(self.kept)}/{len(self.kept)} (baseline {sum(self.baseline_kept)}/{len(self.baseline_kept)})"


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
        if self.trials is not None and (isinstance(self.trials, bool) or not isinstance(self.trials, int)
                                        or self.trials < 1):
            raise RequestError(f"trials must be a whole number >= 1, got {self.trials!r}", "trials")
        if self.minutes is not None and not (isinstance(self.minutes, (int, float)) and 0 < self.minutes <= 10_000):
            raise RequestError(f"minutes must be above 0 (and at most 10000), got {self.minutes!r}", "minutes")
        for name, low in (("tuning_prompts", 1), ("validation_prompts", 1), ("finalists", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RequestError(f"{name.replace('_', ' ')} must be a whole number >= {low}, got {value!r}", name)
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
        return not self.stopped_early and not self.idle_methods and all(s <= 1e-9 for s in self.shortfalls)


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
        return self.complete and all(floor.shortfall(self.quality) <= 1e-9 for floor in self.floors)

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


# ---- the study -------------------------------------------------------------------------------------


class Tuner:
    """One tune in ``out_dir``. ``engine``: a :class:`vdtome.engine.engine.ComparisonEngine` (default: a
    new one on ``device``); ``progress(TuneEvent)``; ``cancel``: anything with ``is_set()``, checked at
    every denoising step: a cancelled tune keeps its finished trials (``--resume`` continues it)."""

    def __init__(self, plan: TunePlan, out_dir: str | Path, engine: Any = None, device: str | None = None,
                 progress: Callable[[TuneEvent], None] | None = None, cancel: Any = None) -> None:
        self.plan = plan
        self.out = Path(out_dir)
        self.progress = progress
        self.cancel = cancel
        self._engine = engine
        self._device = device
        self._baseline_kept: dict[str, bool] = {}
        self._ran, self._spent_s = 0, 0.0

    @property
    def engine(self):
        if self._engine is None:
            from vdtome.engine.engine import ComparisonEngine

            self._engine = ComparisonEngine(device=self._device)
        return self._engine

    # -- public

    def run(self, resume: bool = False) -> TuneOutcome:
        from vdtome.engine.engine import Cancelled

        optuna = _optuna()
        study = self._open(optuna, resume)
        space = self.plan.space()
        if not resume:
            for params in space.seeds():
                study.enqueue_trial(params, user_attrs={"seed": True})
        idle = 0
        while not self._budget_spent(study):
            if idle >= MAX_IDLE_DRAWS:
                self._say(study, f"{MAX_IDLE_DRAWS} draws in a row were refused stacks or repeats: the space is "
                                 "exhausted at this budget")
                break
            trial = study.ask()
            try:
                drawn = space.suggest(trial)
            except RequestError as error:
                _refuse(study, trial, error)
                idle += 1
                continue
            repeat = _finished_with(study, trial.params, trial.number)
            if repeat is not None:
                trial.set_user_attr("repeat_of", repeat.number)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                idle += 1
                continue
            try:
                self._evaluate(optuna, study, trial, drawn)
                idle = 0
            except RequestError as error:  # a rule checked as the stack is applied (a cross-method rule)
                _refuse(study, trial, error)
                idle += 1
            except Cancelled:
                # Stopped within a step: the finished trials are kept, this one is drawn again by --resume.
                trial.set_user_attr("interrupted", True)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
                records = trial_records(study)
                return self._finish(study, records, [], None, _idle_draws(study), cancelled=True)
        records = trial_records(study)
        self._say(study, "validating the finalists on the held-out prompts")
        try:
            finalists, closest = self._validate(records)
        except Cancelled:  # the validation comparisons finished so far are kept in validation.jsonl
            return self._finish(study, records, [], None, _idle_draws(study), cancelled=True)
        return self._finish(study, records, finalists, closest, _idle_draws(study))

    # -- the study's storage

    def _open(self, optuna, resume: bool):
        self.out.mkdir(parents=True, exist_ok=True)
        db, plan_file = self.out / STUDY_FILE, self.out / PLAN_FILE
        stored = json.loads(plan_file.read_text()) if plan_file.is_file() else None
        if db.exists() and not resume:
            raise RequestError(f"{self.out} holds a tune already: --resume continues it, or choose another --out", "out")
        if resume:
            if stored is None or not db.exists():
                raise RequestError(f"{self.out} holds no tune to resume (no {PLAN_FILE} and {STUDY_FILE})", "out")
            mine = self.plan.to_dict()
            differ = [key for key in mine if key not in ("trials", "minutes") and stored.get(key) != mine[key]]
            if differ:
                raise RequestError(f"the tune in {self.out} was made with other settings: {', '.join(differ)} "
                                   f"({', '.join(f'{k}={stored.get(k)!r}' for k in differ)}); resume it with them",
                                   differ[0])
        plan_file.write_text(json.dumps(self.plan.to_dict(), indent=1) + "\n")
        # The floors reach the sampler as each trial's constraints (Trial.set_constraint).
        sampler = optuna.samplers.TPESampler(seed=self.plan.seed, multivariate=True, n_startup_trials=8)
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, sampler=sampler,
                                    directions=["maximize", "maximize"], load_if_exists=resume)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["denoising speedup", "mean PSNR (dB)"])
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            # Interrupted (killed, cancelled): failed, and its stack drawn again first.
            study_id = storage.get_study_id_from_name(STUDY_NAME)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_user_attr(trial_id, "interrupted", True)
            storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL)
            if trial.params:
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        return study

    def _budget_spent(self, study) -> bool:
        """Trials that ran (those that failed running included: a stack whose video went NaN is
        an answer too) and the seconds they ran, against the budget."""
        ran = [t for t in study.get_trials(deepcopy=False) if "seconds" in t.user_attrs and t.state.is_finished()]
        self._ran, self._spent_s = len(ran), sum(t.user_attrs["seconds"] for t in ran)
        if self.plan.trials is not None and len(ran) >= self.plan.trials:
            return True
        return self.plan.minutes is not None and self._spent_s >= self.plan.minutes * 60

    # -- one trial

    def _evaluate(self, optuna, study, trial, drawn) -> None:
        from vdtome.methods.stack import stack_label

        label = stack_label(drawn.configs)
        self._say(study, f"trial {trial.number}: {label}")
        started = time.perf_counter()
        speeds, psnr, ssim, kept, base = [], [], [], [], []
        idle_methods: set[str] = set()
        stopped = False
        for index, prompt in enumerate(self.plan.tuning()):
            result = self._compare(prompt, drawn.configs, rounds=1)
            if not result.ok or result.fidelity is None or result.speedup("denoising") is None:
                trial.set_user_attr("error", result.error or "no fidelity or timing")
                trial.set_user_attr("stack", [[name, values] for name, values in drawn.values])
                trial.set_user_attr("label", label)
                trial.set_user_attr("seconds", time.perf_counter() - started)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                return
            idle_methods |= {m.label for m in result.methods if m.report.evidence and not m.report.acted}
            speeds.append(result.speedup("denoising").value)
            psnr.append(result.fidelity.psnr_mean)
            ssim.append(result.fidelity.ssim_mean)
            if judged(self.plan.model()):
                kept.append(self._kept(prompt, result.accelerated.frames))
                base.append(self._baseline_judged(prompt, result))
            quality = Quality(tuple(psnr), tuple(ssim), tuple(kept), tuple(base))
            below = [floor for floor in self.plan.floors if _below_already(floor, quality, len(self.plan.tuning()))]
            if below and index + 1 < len(self.plan.tuning()):
                stopped = True  # below a floor already: the other prompts cannot lift it
                break
        quality = Quality(tuple(psnr), tuple(ssim), tuple(kept), tuple(base))
        speed = math.exp(statistics.fmean(math.log(s) for s in speeds))
        attrs = {"stack": [[name, values] for name, values in drawn.values], "label": label, "speedup": speed,
                 "psnr": list(psnr), "ssim": list(ssim), "kept": list(kept), "baseline_kept": list(base),
                 "shortfalls": [floor.shortfall(quality) for floor in self.plan.floors],
                 "idle_methods": sorted(idle_methods), "stopped_early": stopped, "seconds": time.perf_counter() - started}
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        for floor, shortfall in zip(self.plan.floors, attrs["shortfalls"]):
            trial.set_constraint(f"floor {floor.text()}", shortfall)
        # A method that did nothing (every evidence count 0) makes the stack no recipe: the same
        # speed without it.
        trial.set_constraint("every method acted", float(len(idle_methods)))
        study.tell(trial, [speed, quality.psnr_mean])
        self._ran += 1
        self._spent_s += attrs["seconds"]
        self._say(study, f"trial {trial.number}: {speed:.2f}x, PSNR {quality.psnr_mean:.1f} dB"
                         + (f", judge {quality.kept_text()}" if kept else "")
                         + (" (stopped early: below a floor)" if stopped else "")
                         + (f" ({', '.join(sorted(idle_methods))} did nothing: not a recipe)" if idle_methods else ""),
                  finished=next(r for r in trial_records(study) if r.number == trial.number))

    def _compare(self, prompt: str, configs: tuple[Any, ...], rounds: int | None):
        return self.engine.run(self.plan.request(prompt, configs, rounds), write=False, cancel=self.cancel)

    def _kept(self, prompt: str, frames) -> bool:
        from vdtome.core.frames import to_uint8
        from vdtome.offline import shapes

        verdict = shapes.judge(to_uint8(frames), shapes.Scene.from_prompt(prompt))
        return verdict.colour_right and verdict.direction_right

    def _baseline_judged(self, prompt: str, result) -> bool:
        if prompt not in self._baseline_kept:
            self._baseline_kept[prompt] = self._kept(prompt, result.baseline.frames)
        return self._baseline_kept[prompt]

    # -- finalists

    def _validate(self, records: Sequence[TrialRecord]) -> tuple[list[Finalist], Finalist | None]:
        """The feasible front, fastest first, each on the validation prompts with the full protocol
        until one keeps every floor there and is faster (the fastest front points hug the floor and
        often fall under it on new prompts), at most ``finalists`` of them; a finalist already under a
        floor is not run on its remaining prompts. None feasible: the closest trial, validated alike
        so the report can show how far it is."""
        front = pareto(r for r in records if r.feasible)
        closest = None
        if not front:
            ran = [r for r in records if not r.stopped_early] or list(records)
            if not ran:
                return [], None
            closest = min(ran, key=lambda r: (sum(max(s, 0.0) for s in r.shortfalls), -r.speedup))
            front = [closest]
        done = self._validation_rows()
        prompts = self.plan.validation()
        finalists = []
        for record in front[:self.plan.finalists]:
            figures = []
            for prompt in prompts:
                key = f"{record.number}|{prompt}"
                if key not in done:
                    done[key] = self._validate_one(record, prompt)
                    with (self.out / VALIDATION_FILE).open("a") as rows:
                        rows.write(json.dumps({"key": key, **asdict(done[key])}) + "\n")
                figures.append(done[key])
                partial = Finalist(record, tuple(figures), self.plan.floors, len(prompts))
                if any(_below_already(floor, partial.quality, len(prompts)) for floor in self.plan.floors):
                    break
            finalists.append(Finalist(record, tuple(figures), self.plan.floors, len(prompts)))
            if finalists[-1].passes and finalists[-1].speedup > 1.0:
                break
        if closest is not None:
            return [], finalists[0]
        return finalists, None

    def _validation_rows(self) -> dict[str, PromptFigures]:
        path = self.out / VALIDATION_FILE
        rows = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    data = json.loads(line)
                    key = data.pop("key")
                    rows[key] = PromptFigures(**data)
                except (ValueError, TypeError, KeyError, AttributeError):
                    continue  # a line cut short by a kill
        return rows

    def _validate_one(self, record: TrialRecord, prompt: str) -> PromptFigures:
        from vdtome.methods.registry import METHODS

        if self.progress is not None:
            self.progress(TuneEvent(f"validating trial {record.number} ({record.label}) on {prompt!r}",
                                    self._ran, self.plan.trials, None, 0))
        configs = tuple(METHODS[name].from_form(values) for name, values in record.stack)
        result = self._compare(prompt, configs, self.plan.rounds)
        if not result.ok:
            raise RuntimeError(f"validating trial {record.number} on {prompt!r} failed: {result.error}")
        ratio = result.speedup("denoising")
        e2e = result.speedup("end_to_end")
        kept = base = None
        if judged(self.plan.model()):
            kept = self._kept(prompt, result.accelerated.frames)
            base = self._baseline_judged(prompt, result)
        busy = bool(result.timing is not None and result.timing.busy_warning)
        return PromptFigures(prompt, ratio.value, ratio.low, ratio.high, ratio.verdict.value,
                             None if e2e is None else e2e.value, result.fidelity.psnr_mean, result.fidelity.ssim_mean,
                             kept, base, busy)

    # -- outputs

    def _finish(self, study, records, finalists, closest, idle, cancelled: bool = False) -> TuneOutcome:
        from vdtome.bench.tune_report import write_report, write_trials_csv

        passing = [f for f in finalists if f.passes and f.speedup > 1.0]
        chosen = max(passing, key=lambda f: f.speedup) if passing else None
        files = {"trials": str(write_trials_csv(records, self.plan, self.out / TRIALS_FILE))}
        if chosen is not None:
            message = (f"chosen: trial {chosen.trial.number}, {chosen.trial.label}: {chosen.speedup:.2f}x denoising "
                       f"(median of {len(chosen.prompts)} validation prompts"
                       f"{', faster on every one' if chosen.faster_everywhere else ', not faster on every one'}), "
                       f"PSNR >= {min(chosen.quality.psnr):.1f} dB"
                       + (f", judge {chosen.quality.kept_text()}" if chosen.quality.kept else ""))
        elif finalists:
            best = max(finalists, key=lambda f: sum(-max(fl.shortfall(f.quality), 0) for fl in self.plan.floors))
            message = (f"no finalist kept the floor and was faster on the validation prompts; the closest: trial "
                       f"{best.trial.number}, "
                       f"{best.trial.label}: {best.speedup:.2f}x, PSNR >= {min(best.quality.psnr):.1f} dB"
                       + (f", judge {best.quality.kept_text()}" if best.quality.kept else ""))
            closest = best
        elif closest is not None:
            message = (f"no trial met the floor on the tuning prompts; the closest: trial {closest.trial.number}, "
                       f"{closest.trial.label}: {closest.speedup:.2f}x on the validation prompts, PSNR >= "
                       f"{min(closest.quality.psnr):.1f} dB"
                       + (f", judge {closest.quality.kept_text()}" if closest.quality.kept else ""))
        else:
            message = "no trial ran"
        if cancelled:
            message = (f"cancelled: {len(records)} finished trials kept ({self.out}); no recipe without the "
                       "validation; `python -m vdtome tune ... --resume` continues it")
        seconds = [r.seconds for r in records]
        to_chosen = None
        if chosen is not None:
            to_chosen = 1 + [r.number for r in records].index(chosen.trial.number)
        from vdtome.measure.environment import environment

        outcome = TuneOutcome(self.plan, tuple(records), idle, tuple(finalists), chosen, files, message,
                              statistics.fmean(seconds) if seconds else None, to_chosen, environment(self.engine.device),
                              cancelled)
        if chosen is not None:
            files["recipe"] = str(self._recipe(outcome).save(self.out / RECIPE_FILE))
        files["report"] = str(write_report(outcome, closest, self.out / REPORT_FILE))
        return replace(outcome, files=files)

    def _recipe(self, outcome: TuneOutcome):
        from vdtome.methods.recipe import Recipe

        chosen, finalists, records = outcome.chosen, outcome.finalists, outcome.trials
        settings = self.plan.settings()
        preset = self.plan.model()
        front = [{"trial": r.number, "stack": r.label, "speedup_estimate": r.speedup, "psnr_mean": r.quality.psnr_mean,
                  "ssim_min": min(r.quality.ssim)} for r in pareto(r for r in records if r.feasible)]
        return Recipe(
            preset=preset.name, pipeline_class=preset.pipeline_class, frames=settings.frames, height=settings.height,
            width=settings.width, steps=settings.steps, guidance=settings.guidance,
            stack=chosen.trial.stack,
            tuning={"floors": [f.text() for f in self.plan.floors],
                    "floors_described": [f.describe() for f in self.plan.floors],
                    "prompt_set": self.plan.prompt_set(), "tuning_prompts": list(self.plan.tuning()),
                    "validation_prompts": list(self.plan.validation()), "seed": self.plan.seed,
                    "trials_run": len(records), "trial": chosen.trial.number, "search": outcome.search_text(),
                    "finalists": [f.to_dict() for f in finalists], "made": time.strftime("%Y-%m-%d %H:%M")},
            validation=chosen.to_dict(), front=tuple(front), environment=outcome.environment)

    def _say(self, study, message: str, finished: TrialRecord | None = None) -> None:
        if self.progress is None:
            return
        left = None if self.plan.minutes is None else max(self.plan.minutes - self._spent_s / 60, 0.0)
        front = pareto(r for r in trial_records(study) if r.feasible)
        self.progress(TuneEvent(message, self._ran, self.plan.trials, left, len(front), finished))


def _optuna():
    try:
        import optuna
    except ImportError:
        raise RequestError("the tuner needs Optuna: pip install 'vdtome[bench]' (or optuna==5.0.0)", "tune") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _idle_draws(study) -> int:
    """Draws of the whole study (every run of it) that ran nothing: refused stacks, repeats."""
    return sum(1 for t in study.get_trials(deepcopy=False) if {"refused", "repeat_of"} & set(t.user_attrs))


def _refuse(study, trial, error: RequestError) -> None:
    """A stack the rules refuse, never run: told to the sampler as the worst point and infeasible
    (a failed trial would teach it nothing, and it would draw the same region again)."""
    trial.set_user_attr("refused", str(error))
    trial.set_constraint("a stack the rules take", 1.0)
    study.tell(trial, [0.0, 0.0])


def _below_already(floor: Floor, quality: Quality, prompts: int) -> bool:
    """Whether the first prompts of ``prompts`` put the trial below ``floor`` whatever the others
    give: a PSNR or SSIM under it on one prompt, or a judge deficit the remaining prompts cannot
    make up (each can gain at most one clip on the baseline)."""
    if floor.measure == JUDGE:
        deficit = sum(quality.baseline_kept) - sum(quality.kept)
        return deficit - (prompts - len(quality.kept)) > floor.value
    return floor.shortfall(quality) > 0


def _finished_with(study, params: Mapping[str, Any], number: int):
    """A finished trial (not this one) that drew exactly ``params``, or None."""
    for other in study.get_trials(deepcopy=False):
        if other.number != number and other.state.is_finished() and other.params == params \
                and "stack" in other.user_attrs:
            return other
    return None


def trial_records(study) -> list[TrialRecord]:
    """The trials that ran (complete), in order."""
    out = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if trial.state.name != "COMPLETE" or "speedup" not in attrs:
            continue
        out.append(TrialRecord(
            number=trial.number, stack=tuple((name, dict(values)) for name, values in attrs["stack"]),
            label=attrs["label"], speedup=attrs["speedup"],
            quality=Quality(tuple(attrs["psnr"]), tuple(attrs["ssim"]), tuple(attrs["kept"]),
                            tuple(attrs["baseline_kept"])),
            shortfalls=tuple(attrs["shortfalls"]), seconds=attrs["seconds"], stopped_early=attrs["stopped_early"],
            idle_methods=tuple(attrs.get("idle_methods", ()))))
    return out


def pareto(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """Trials nothing beats on both speed and mean PSNR, faster than the baseline, fastest first."""
    points = [r for r in records if r.speedup > 1.0]
    front = [r for r in points if not any(
        o.speedup >= r.speedup and o.quality.psnr_mean >= r.quality.psnr_mean
        and (o.speedup > r.speedup or o.quality.psnr_mean > r.quality.psnr_mean) for o in points)]
    return sorted(front, key=lambda r: -r.speedup)
