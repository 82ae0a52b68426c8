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
- The feasible Pareto front is walked fastest first: each **finalist** is re-run with the full
  timing protocol (the preset's independent rounds, intervals, verdicts) on the held-out validation
  prompts until one is faster and keeps every floor on every one of them: the chosen recipe. If none
  does, the tune says so and shows the closest.

Outputs in ``DIR``: ``recipe.json``, ``trials.csv``, ``report.html`` (the front and every trial),
``validation.jsonl`` (each validation comparison as it finished), ``plan.json``.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from vdtome.bench.tune_plan import (
    Finalist,
    Floor,
    PromptFigures,
    Quality,
    TrialRecord,
    TuneEvent,
    TuneOutcome,
    TunePlan,
    pareto,
)
from vdtome.bench.tune_worker import LocalTrials, TrialRun, TrialWorker
from vdtome.core.validation import RequestError

STUDY_FILE = "study.db"
STUDY_NAME = "tune"
PLAN_FILE = "plan.json"
RECIPE_FILE = "recipe.json"
TRIALS_FILE = "trials.csv"
VALIDATION_FILE = "validation.jsonl"
REPORT_FILE = "report.html"
PLOT_FILE = "pareto.png"
#: Trials in a row that ran nothing (a refused stack, a repeat of a finished one) before the tune
#: says the space is exhausted.
MAX_IDLE_DRAWS = 200
#: Settings a resumed tune may change: its budget, and how its finalists are validated (more
#: validation prompts re-use the comparisons already made on the first ones; no trial is re-run).
RESUMABLE_CHANGES = ("trials", "minutes", "validation_prompts", "finalists", "rounds")
#: The study's record of the floors its trials were drawn under (Optuna's constraints): a resume
#: whose budget is spent may choose again under other floors, from the trials' kept figures.
SEARCH_FLOORS = "search_floors"


# ---- the study -------------------------------------------------------------------------------------


class Tuner:
    """One tune in ``out_dir``. ``engine``: a :class:`vdtome.engine.engine.ComparisonEngine` (default: a
    new one on ``device``); ``progress(TuneEvent)``; ``cancel``: anything with ``is_set()``, checked at
    every denoising step: a cancelled tune keeps its finished trials (``--resume`` continues it);
    ``trials``: where the comparisons run (default: this process, with ``engine``; a
    :class:`vdtome.bench.tune_worker.RayTrials` for Ray actors)."""

    def __init__(self, plan: TunePlan, out_dir: str | Path, engine: Any = None, device: str | None = None,
                 progress: Callable[[TuneEvent], None] | None = None, cancel: Any = None,
                 trials: Any = None) -> None:
        self.plan = plan
        self.out = Path(out_dir)
        self.progress = progress
        self.trials = trials or LocalTrials(TrialWorker(plan, device=device, engine=engine), cancel)

    # -- public

    def run(self, resume: bool = False) -> TuneOutcome:
        from vdtome.engine.engine import Cancelled

        optuna = _optuna()
        try:  # whatever ends the tune, refusals included, gives its workers back
            study = self._open(optuna, resume)
            searched = study.user_attrs[SEARCH_FLOORS]
            if searched != [floor.text() for floor in self.plan.floors] and not self._budget_spent(study):
                raise RequestError(f"the trials in {self.out} were drawn under the floors {', '.join(searched)}: a "
                                   "resume may change the floors only to choose again among the trials run (their "
                                   "figures are kept), not to draw more under other floors; start a new tune for "
                                   "that", "floor")
            try:
                self._search(optuna, study, resume)
            except Cancelled:
                return self._finish(study, trial_records(study, self.plan.floors), [], None, cancelled=True)
            records = trial_records(study, self.plan.floors)
            self._say(study, "validating the finalists on the held-out prompts")
            try:
                finalists, closest = self._validate(records)
            except Cancelled:  # the validation comparisons finished so far are kept in validation.jsonl
                return self._finish(study, records, [], None, cancelled=True)
            return self._finish(study, records, finalists, closest)
        finally:
            self.trials.shutdown()

    def _search(self, optuna, study, resume: bool) -> None:
        """Draws and runs trials until the budget is spent, as many at once as the pool runs. A trial
        under way when the search is cancelled is failed and drawn again first by ``--resume``."""
        from vdtome.engine.engine import Cancelled
        from vdtome.methods.stack import stack_label

        space = self.plan.space()
        if not resume:
            for params in space.seeds():
                study.enqueue_trial(params, user_attrs={"seed": True})
        running: dict[int, Any] = {}  # trial number -> Optuna trial, under way
        idle = 0  # draws in a row that ran nothing
        while True:
            while len(running) < self.trials.size and not self._budget_spent(study, len(running)):
                if idle >= MAX_IDLE_DRAWS:
                    break
                trial = study.ask()
                try:
                    drawn = space.suggest(trial)
                except RequestError as error:
                    _refuse(study, trial, error)
                    idle += 1
                    continue
                repeat = _finished_with(study, trial.params, trial.number) or \
                    next((t for t in running.values() if t.params == trial.params), None)
                if repeat is not None:
                    trial.set_user_attr("repeat_of", repeat.number)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    idle += 1
                    continue
                label = stack_label(drawn.configs)
                trial.set_user_attr("stack", [[name, values] for name, values in drawn.values])
                trial.set_user_attr("label", label)
                self._say(study, f"trial {trial.number}: {label}")
                self.trials.submit(trial.number, drawn.values)
                running[trial.number] = trial
            if not running:
                if idle >= MAX_IDLE_DRAWS:
                    self._say(study, f"{MAX_IDLE_DRAWS} draws in a row were refused stacks or repeats: the space is "
                                     "exhausted at this budget")
                return
            try:
                number, run = self.trials.next_finished()
            except Cancelled:
                for trial in running.values():  # stopped within a step: drawn again by --resume
                    trial.set_user_attr("interrupted", True)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
                raise
            trial = running.pop(number)
            if run.refused is not None:
                _refuse(study, trial, RequestError(run.refused, "stack"))
                idle += 1
            else:
                self._tell(optuna, study, trial, run)
                idle = 0

    # -- the study's storage

    def _open(self, optuna, resume: bool):
        self.out.mkdir(parents=True, exist_ok=True)
        db, plan_file = self.out / STUDY_FILE, self.out / PLAN_FILE
        stored = json.loads(plan_file.read_text()) if plan_file.is_file() else None
        if db.exists() and not resume:
            raise RequestError(f"{self.out} holds a tune already: --resume continues it, or choose another --out",
                               "out")
        if resume:
            if stored is None or not db.exists():
                raise RequestError(f"{self.out} holds no tune to resume (no {PLAN_FILE} and {STUDY_FILE})", "out")
            mine = self.plan.to_dict()
            differ = [key for key in mine
                      if key not in (*RESUMABLE_CHANGES, "floors") and stored.get(key) != mine[key]]
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
        study_id = storage.get_study_id_from_name(STUDY_NAME)
        if SEARCH_FLOORS not in study.user_attrs:  # a new study (or one made before it was recorded)
            study.set_user_attr(SEARCH_FLOORS, stored["floors"] if resume else [f.text() for f in self.plan.floors])
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            # Interrupted (killed, cancelled): failed, and its stack drawn again first.
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_user_attr(trial_id, "interrupted", True)
            storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL)
            if trial.params:
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        return study

    def _budget_spent(self, study, running: int = 0) -> bool:
        """Whether the budget is spent, counting the ``running`` trials under way: ``trials`` run,
        or ``minutes`` of trials per worker (on one worker: the search's own time)."""
        ran, seconds = _spent(study)
        if self.plan.trials is not None and ran + running >= self.plan.trials:
            return True
        return self.plan.minutes is not None and seconds >= self.plan.minutes * 60 * self.trials.size

    # -- one trial

    def _tell(self, optuna, study, trial, run: TrialRun) -> None:
        """A trial's figures to the study: its objectives, the floors as constraints."""
        trial.set_user_attr("seconds", run.seconds)
        trial.set_user_attr("worker", run.worker)
        if run.error is not None:
            trial.set_user_attr("error", run.error)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self._say(study, f"trial {trial.number} failed: {run.error}", finished=trial.number)
            return
        quality = run.quality
        attrs = {"speedup": run.speedup, "psnr": list(quality.psnr), "ssim": list(quality.ssim),
                 "kept": list(quality.kept), "baseline_kept": list(quality.baseline_kept),
                 "idle_methods": list(run.idle_methods), "stopped_early": run.stopped_early}
        for key, value in attrs.items():  # what trial_records reads back (its shortfalls under any floors)
            trial.set_user_attr(key, value)
        for floor in self.plan.floors:
            trial.set_constraint(f"floor {floor.text()}", floor.shortfall(quality))
        # A method that did nothing (every evidence count 0) makes the stack no recipe: the same
        # speed without it.
        trial.set_constraint("every method acted", float(len(run.idle_methods)))
        study.tell(trial, [run.speedup, quality.psnr_mean])
        self._say(study, f"trial {trial.number}: {run.speedup:.2f}x, PSNR {quality.psnr_mean:.1f} dB"
                         + (f", judge {quality.kept_text()}" if quality.kept else "")
                         + (" (stopped early: below a floor)" if run.stopped_early else "")
                         + (f" ({', '.join(run.idle_methods)} did nothing: not a recipe)" if run.idle_methods else ""),
                  finished=trial.number)

    # -- finalists

    def _validate(self, records: Sequence[TrialRecord]) -> tuple[list[Finalist], Finalist | None]:
        """The feasible front's fastest point on the validation prompts with the full protocol,
        then the fastest of the front recomputed without it, and so on, until one keeps every floor
        there and is faster (the fastest points hug the floor and often fall under it on new prompts),
        at most ``finalists`` of them; a finalist already under a floor is not run on its remaining
        prompts. Recomputed, not walked once: a trial that a fallen point dominated on the tuning
        prompts may still keep the floor on new ones (MagCache's defaults, estimated 1.73x, sat behind
        a 1.80x point that fell to 23 dB). None feasible: the closest trial, validated alike so the
        report can show how far it is."""
        candidates = [r for r in records if r.feasible]
        closest = None
        if not pareto(candidates):
            ran = [r for r in records if not r.stopped_early] or list(records)
            if not ran:
                return [], None
            closest = min(ran, key=lambda r: (sum(max(s, 0.0) for s in r.shortfalls), -r.speedup))
        done = self._validation_rows()
        prompts = self.plan.validation()
        finalists: list[Finalist] = []
        while len(finalists) < self.plan.finalists:
            walked = {f.trial.number for f in finalists}
            front = pareto(r for r in candidates if r.number not in walked) or (
                [closest] if closest is not None and not finalists else [])
            if not front:
                break
            record = front[0]
            figures = []
            for prompt in prompts:
                key = f"{record.number}|{prompt}"
                if key not in done:
                    if self.progress is not None:
                        self.progress(TuneEvent(f"validating trial {record.number} ({record.label}) on {prompt!r}",
                                                len(records), self.plan.trials, None, len(front)))
                    done[key] = self.trials.validate(record.stack, prompt)
                    with (self.out / VALIDATION_FILE).open("a") as rows:
                        rows.write(json.dumps({"key": key, **asdict(done[key])}) + "\n")
                figures.append(done[key])
                partial = Finalist(record, tuple(figures), self.plan.floors, len(prompts))
                if any(floor.broken(partial.quality) for floor in self.plan.floors):
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

    # -- outputs

    def _finish(self, study, records, finalists, closest, cancelled: bool = False) -> TuneOutcome:
        from vdtome.bench.tune_report import write_report, write_trials_csv

        passing = [f for f in finalists if f.passes and f.speedup > 1.0]
        chosen = max(passing, key=lambda f: f.speedup) if passing else None
        files = {"trials": str(write_trials_csv(records, self.plan, self.out / TRIALS_FILE))}
        if chosen is not None:
            message = (f"chosen: trial {chosen.trial.number}, {chosen.trial.label}: {chosen.speedup:.2f}x denoising "
                       f"(median of {len(chosen.prompts)} validation prompts"
                       f"{', faster on every one' if chosen.faster_everywhere else ', not faster on every one'}), "
                       f"{chosen.quality_text()}")
        elif finalists:
            best = max(finalists, key=lambda f: sum(-max(fl.shortfall(f.quality), 0) for fl in self.plan.floors))
            message = (f"no finalist kept the floor and was faster on the validation prompts; the closest: trial "
                       f"{best.trial.number}, {best.trial.label}: {best.speedup:.2f}x, {best.quality_text()}")
            closest = best
        elif closest is not None:
            message = (f"no trial met the floor on the tuning prompts; the closest: trial {closest.trial.number}, "
                       f"{closest.trial.label}: {closest.speedup:.2f}x on the validation prompts, "
                       f"{closest.quality_text()}")
        else:
            message = "no trial ran"
        if cancelled:
            message = (f"cancelled: {len(records)} finished trials kept ({self.out}); no recipe without the "
                       "validation; `python -m vdtome tune ... --resume` continues it")
        seconds = [r.seconds for r in records]
        to_chosen = None
        if chosen is not None:
            to_chosen = 1 + [r.number for r in records].index(chosen.trial.number)
        outcome = TuneOutcome(self.plan, tuple(records), _idle_draws(study), tuple(finalists), chosen, files, message,
                              statistics.fmean(seconds) if seconds else None, to_chosen,
                              self.trials.environment(), cancelled)
        if chosen is not None:
            files["recipe"] = str(self._recipe(outcome, study.user_attrs[SEARCH_FLOORS]).save(self.out / RECIPE_FILE))
        elif not cancelled:  # a resume that chooses nothing (other floors, more prompts) leaves no older recipe
            (self.out / RECIPE_FILE).unlink(missing_ok=True)
        files["report"] = str(write_report(outcome, closest, self.out / REPORT_FILE, self.out / PLOT_FILE))
        files["plot"] = str(self.out / PLOT_FILE)
        return replace(outcome, files=files)

    def _recipe(self, outcome: TuneOutcome, search_floors: list[str]):
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
            tuning={"floors": [f.text() for f in self.plan.floors], "search_floors": search_floors,
                    "floors_described": [f.describe() for f in self.plan.floors],
                    "prompt_set": self.plan.prompt_set(), "tuning_prompts": list(self.plan.tuning()),
                    "validation_prompts": list(self.plan.validation()), "seed": self.plan.seed,
                    "trials_run": len(records), "trial": chosen.trial.number, "search": outcome.search_text(),
                    "finalists": [f.to_dict() for f in finalists], "made": time.strftime("%Y-%m-%d %H:%M")},
            validation=chosen.to_dict(), front=tuple(front), environment=outcome.environment)

    def _say(self, study, message: str, finished: int | None = None) -> None:
        """A progress event; ``finished``: the number of the trial that just finished."""
        if self.progress is None:
            return
        ran, seconds = _spent(study)
        records = trial_records(study, self.plan.floors)
        left = None if self.plan.minutes is None else max(self.plan.minutes - seconds / 60, 0.0)
        front = pareto(r for r in records if r.feasible)
        self.progress(TuneEvent(message, ran, self.plan.trials, left, len(front),
                                next((r for r in records if r.number == finished), None)))


def _optuna():
    try:
        import optuna
    except ImportError:
        raise RequestError("the tuner needs Optuna: pip install 'vdtome[bench]' (or optuna==5.0.0)", "tune") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _spent(study) -> tuple[int, float]:
    """Trials that ran (those that failed running included: a stack whose video went NaN is an
    answer too) and the seconds they ran: what the budget counts."""
    ran = [t for t in study.get_trials(deepcopy=False) if "seconds" in t.user_attrs and t.state.is_finished()]
    return len(ran), sum(t.user_attrs["seconds"] for t in ran)


def _idle_draws(study) -> int:
    """Draws of the whole study (every run of it) that ran nothing: refused stacks, repeats."""
    return sum(1 for t in study.get_trials(deepcopy=False) if {"refused", "repeat_of"} & set(t.user_attrs))


def _refuse(study, trial, error: RequestError) -> None:
    """A stack the rules refuse, never run: told to the sampler as the worst point and infeasible
    (a failed trial would teach it nothing, and it would draw the same region again)."""
    trial.set_user_attr("refused", str(error))
    trial.set_constraint("a stack the rules take", 1.0)
    study.tell(trial, [0.0, 0.0])


def _finished_with(study, params: Mapping[str, Any], number: int):
    """A finished trial (not this one) that drew exactly ``params``, or None."""
    for other in study.get_trials(deepcopy=False):
        if other.number != number and other.state.is_finished() and other.params == params \
                and "stack" in other.user_attrs and "interrupted" not in other.user_attrs:
            return other
    return None


def trial_records(study, floors: Sequence[Floor]) -> list[TrialRecord]:
    """The trials that ran (complete), in order, with their shortfalls under ``floors`` (those the
    study drew them under, or others a resume chose again with)."""
    out = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if trial.state.name != "COMPLETE" or "speedup" not in attrs:
            continue
        quality = Quality(tuple(attrs["psnr"]), tuple(attrs["ssim"]), tuple(attrs["kept"]),
                          tuple(attrs["baseline_kept"]))
        out.append(TrialRecord(
            number=trial.number, stack=tuple((name, dict(values)) for name, values in attrs["stack"]),
            label=attrs["label"], speedup=attrs["speedup"],
            quality=quality, shortfalls=tuple(floor.shortfall(quality) for floor in floors), seconds=attrs["seconds"],
            stopped_early=attrs["stopped_early"], idle_methods=tuple(attrs.get("idle_methods", ()))))
    return out
