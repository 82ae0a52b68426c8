"""vdtome web app: the same prompt and seed through the baseline and the accelerated pipeline.

Widgets only: requests are checked and run by :mod:`vdtome.engine` (through the helpers in
:mod:`vdtome.web.ui`). Runs offline on the built-in tiny models; on a GPU (or a ZeroGPU Space) the
real presets load from the Hugging Face cache or hub.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app never phones home
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# ZeroGPU: `spaces` must be imported before anything touches CUDA (torch included).
try:
    import spaces
except ImportError:
    spaces = None

from vdtome.core.hosting import on_zero_gpu

ON_ZERO_GPU = spaces is not None and on_zero_gpu()

# Every instance works in a private folder (outputs, Gradio's cache, cancel flags): two instances
# on one host never prune or serve each other's files. Set before Gradio reads GRADIO_TEMP_DIR.
from vdtome.engine.storage import instance_folder, prune

INSTANCE_DIR = instance_folder(os.environ.get("GRADIO_TEMP_DIR") or None, prefix="vdtome-app-")
GRADIO_CACHE = INSTANCE_DIR / "gradio"
os.environ["GRADIO_TEMP_DIR"] = str(GRADIO_CACHE)

import dataclasses
import functools
import inspect
import json
import shutil
import signal
import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd
import torch
from starlette.middleware import Middleware

from vdtome.bench.report import pareto_front, write_report
from vdtome.bench.runner import (
    ROW_HEADER,
    SUMMARY_HEADER,
    BenchOutcome,
    BenchPlan,
    BenchRow,
    BenchWorker,
    busy_sentence,
    row_cells,
    run_bench,
    run_serial,
    summary_cells,
)
from vdtome.bench.sweep import shipped_sweeps
from vdtome.core.denoisers import pipeline_denoiser_types
from vdtome.core.presets import load_presets, load_prompts, prompt_sets
from vdtome.core.validation import RequestError, shown
from vdtome.engine.engine import Cancelled, ComparisonEngine, ProgressEvent, default_engine
from vdtome.engine.fidelity import PSNR_CAP_DB
from vdtome.engine.pipelines import (
    ModelUnavailableError,
    custom_models_allowed,
)
from vdtome.engine.report import COLUMNS
from vdtome.engine.request import MAX_ROUNDS, ComparisonRequest
from vdtome.methods import METHODS, FormField, stack_label
from vdtome.methods.recipe import load_recipe
from vdtome.web import history as history_runs
from vdtome.web.cancel import CancelFlag, CancelFlags
from vdtome.web.gates import RequestGates
from vdtome.web.gpu_budget import benchmark_duration, comparison_duration
from vdtome.web.limits import ServiceLimits
from vdtome.web.page import (
    CSS,
    PAGE_SCRIPT,
    cards_html,
    colour_bar_html,
    frame_psnr_chart,
    history_chart,
    latency_chart,
    metrics_html,
    refusal_html,
    table_html,
)
from vdtome.web.serving import ServiceGuard, StrictBlocks, limit_visitors, run_until_abandoned
from vdtome.web.sessions import expire_sessions
from vdtome.web.tune_tab import TuneTabContext, build_tune_tab, shipped_recipe_note, tuned_recipes
from vdtome.web.ui import (
    CUSTOM_MODEL,
    HISTORY_COLUMNS,
    PLOT_COLUMNS,
    PLOT_SPEEDUP,
    SWEEP_FIELD,
    SWEEP_VALUES,
    VIEW_FILE,
    ComparisonView,
    acceleration_title,
    api_fields,
    appended_from,
    comparison_view,
    field_bound,
    form_targets,
    history_export,
    method_defaults,
    panel_title,
    preset_choice_label,
    preset_info,
    preset_line,
    preset_prompts,
    recipe_form,
    settings_from_query,
    settings_query,
    sweep_choices,
    sweep_forms,
    sweep_label,
    sweep_suggestion,
    widget_value,
)

DEFAULT_PRESET = os.environ.get("VDTOME_DEFAULT_PRESET", "tiny-shapes-128")
KEEP_OUTPUTS = 24  # comparison folders kept on disk (a sweep writes up to 8)
KEEP_CACHE_ENTRIES = 200  # files Gradio keeps to serve (about 5 per comparison); older ones go first
GPU_QUEUE = "gpu"  # every generation event shares one queue: two runs on one GPU would time each other

PRESETS = load_presets()
LIMITS = ServiceLimits.from_env(PRESETS)
# ZeroGPU attaches a GPU to each call (the app's own process has none); elsewhere ask torch.
HAS_GPU = ON_ZERO_GPU or torch.cuda.is_available()
GATES = RequestGates(PRESETS, LIMITS, HAS_GPU, ON_ZERO_GPU)

# Files, not events: they reach the ZeroGPU worker that generates (see vdtome.web.cancel).
CANCEL_FLAGS = CancelFlags(INSTANCE_DIR / "cancel")
TUNE_DIR = INSTANCE_DIR / "tunes"

# The endpoints' parameters in the order the page and the API send them (declared by vdtome.web.ui).
COMPARE_FIELDS = api_fields(sweep=False)
SWEEP_FIELDS = api_fields(sweep=True)
# The form's values a run keeps and a shown run restores (custom weights are not part of a run's form).
RUN_FIELDS = tuple(name for name in COMPARE_FIELDS if name != CUSTOM_MODEL)


def engine() -> ComparisonEngine:
    """The process's one engine (vdtome.engine.engine.default_engine), with this instance's folders."""
    return default_engine(output_root=INSTANCE_DIR / "outputs", keep_outputs=KEEP_OUTPUTS,
                          keep_bytes=LIMITS.outputs_mb * 2**20)


# ---- the GPU part (one function, so ZeroGPU can wrap it) ------------------------------------------


def run_requests(requests: list[ComparisonRequest], source: str | None, cancel: CancelFlag,
                 progress=gr.Progress(), forms: list[dict] | None = None) -> list[ComparisonView]:
    """Run one comparison per request on the shared engine; stops early when cancelled, and then
    deletes what the earlier points of a sweep wrote (nobody will be shown them). ``forms``: the
    form's values of each request, saved with its view (showing it again restores them)."""
    views: list[ComparisonView] = []
    try:
        for index, request in enumerate(requests):
            prefix = f"{stack_label(request.methods)} ({index + 1}/{len(requests)}) · " if len(requests) > 1 else ""

            def report(event: ProgressEvent, index=index, prefix=prefix) -> None:
                progress((index + event.done / max(event.total, 1)) / len(requests), desc=prefix + event.label)

            progress(index / len(requests), desc=f"{prefix}loading {request.preset}")
            result = engine().run(request, progress=report, cancel=cancel, source=source)
            view = comparison_view(result, request.methods)
            if forms is not None:
                view = dataclasses.replace(view, form=forms[index])
            view.save()  # beside the videos: the history shows this run again from it
            views.append(view)
            if not result.ok:
                break
    except Cancelled:
        _discard(views)
        raise
    return views


def _discard(views: list[ComparisonView]) -> None:
    """Delete the outputs of views nobody will be shown (a cancelled request's)."""
    for view in views:
        engine().discard(view.files)


def _gpu_duration(requests: list[ComparisonRequest], source: str | None, cancel: CancelFlag, progress=None,
                  forms=None) -> int:
    """Seconds to ask ZeroGPU for: loading, warm-ups, every timed round and both decodes."""
    return comparison_duration(PRESETS[requests[0].preset], requests)


if ON_ZERO_GPU:
    run_requests = spaces.GPU(duration=_gpu_duration)(run_requests)


# ---- checking a request (the same code before it is queued and when it runs) ---------------------


def plan(values: dict, sweep: bool = False) -> tuple[list[ComparisonRequest], str | None]:
    """Requests and the custom-weights source from the form's values, every rule checked
    (:meth:`vdtome.web.gates.RequestGates.comparison`)."""
    return GATES.comparison(values, sweep)


def validator(names: tuple[str, ...], sweep: bool):
    """Gradio's validator for the comparison endpoints (see :func:`field_validator`)."""
    return field_validator(names, lambda fields: plan(fields, sweep))


def field_validator(names: tuple[str, ...], planner):
    """Gradio's validator for an endpoint whose inputs are ``names``: runs ``planner`` (the same
    check the handler runs) when the request is submitted, so a bad one is refused with the message
    beside its field before it takes a queue place."""

    def check(*values):
        fields = dict(zip(names, values))
        try:
            planner(fields)
        except RequestError as error:
            at = names.index(error.field) if error.field in names else 0
            return [gr.validate(index != at, str(error) if index == at else "") for index in range(len(names))]
        return [gr.validate(True, "") for _ in names]

    return check


# ---- event handlers ------------------------------------------------------------------------------


async def _cancellable(what: str, work, discard, cleanup=lambda: None):
    """Run ``work(flag)`` in a worker thread until it ends; a cancelled event or a departed client
    sets the flag, which stops it at its next denoising step. ``discard`` gets what an abandoned run
    returned; ``cleanup`` runs when it failed or was cancelled (nobody will be shown its files)."""
    flag = CANCEL_FLAGS.new()

    def stop(reason: str) -> None:
        print(f"vdtome: stopping a {what}: {reason}", flush=True)
        flag.set()

    try:
        return await run_until_abandoned(lambda: work(flag), stop, discard=discard)
    except (RequestError, ModelUnavailableError) as error:
        cleanup()
        raise gr.Error(str(error), title=f"Cannot run this {what}") from None
    except Cancelled as error:
        cleanup()
        print(f"vdtome: {error}; nothing was kept", flush=True)
        raise gr.Error(f"The {what} was cancelled.", title="Cancelled") from None
    finally:
        flag.clear()


async def _execute(requests: list[ComparisonRequest], source: str | None, progress,
                   forms: list[dict] | None = None) -> list[ComparisonView]:
    """One comparison or a sweep, cancellable (see :func:`_cancellable`)."""
    prune(GRADIO_CACHE, KEEP_CACHE_ENTRIES, LIMITS.cache_mb * 2**20)  # before this run's files arrive
    return await _cancellable("comparison", lambda flag: run_requests(requests, source, flag, progress=progress,
                                                                      forms=forms), _discard)


def _history_outputs(history: list[dict]):
    """Table, the API's point list (unchanged since before the chart), the chart, the run picker."""
    table = pd.DataFrame([entry["row"] for entry in history], columns=list(HISTORY_COLUMNS))
    # Identical videos (ratio 0) have no finite PSNR: in the point list they are left out.
    points = pd.DataFrame([entry["point"] for entry in history if entry.get("point") is not None
                           and entry["point"]["PSNR vs baseline (dB)"] < PSNR_CAP_DB], columns=list(PLOT_COLUMNS))
    runs = history_runs.run_choices(history)
    return table, points, _chart(history), gr.Dropdown(choices=runs, value=None)


def _chart(history: list[dict], group: str | None = None):
    """The speedup/fidelity chart of one model and size (``group``; default: the latest run's):
    runs of another size or model would share its axes without being comparable."""
    runs, group = history_runs.chart_runs(history, group)
    try:
        return history_chart(runs, scope=group or "")
    except (KeyError, TypeError, ValueError):  # a stored point of another shape: the table still shows
        return None


def keep_history(history, stored=None):
    """After a run: the history (rejoined to the runs the browser kept, should the server have let
    this session's state go meanwhile), kept in the browser, shown, and the chart's groups (the
    latest run's chosen)."""
    kept = history_runs.rejoined(stored, history, LIMITS.history_rows)
    shown = _history_outputs(kept) if kept != history else (gr.skip(),) * 4  # the run showed it already
    return kept, kept, *shown, _chart_groups(kept)


def _chart_groups(history: list[dict]):
    groups = history_runs.chart_groups(history)
    return gr.Dropdown(choices=groups, value=groups[0][1] if groups else None)


def on_chart_group(group, history):
    return _chart(history_runs.checked(history), group)


FRAME_SIDES = ("baseline", "accelerated")


def _frame_pair(view: ComparisonView | None, frame: int) -> tuple[str, str] | None:
    """The baseline's and the accelerated video's PNGs of one frame (None when not saved)."""
    if view is None or "frames" not in view.files:
        return None
    folder = Path(view.files["frames"])
    paths = tuple(str(folder / f"{side}_{int(frame):03d}.png") for side in FRAME_SIDES)
    return paths if all(Path(p).exists() for p in paths) else None


def _worst_frame(view: ComparisonView | None) -> int:
    if view is None or not view.frame_psnr:
        return 0
    return min(range(len(view.frame_psnr)), key=view.frame_psnr.__getitem__)


# The outputs every result shows, in this order (the first eight are the API's since the start).
RESULT_OUTPUTS = ("side_by_side", "baseline_video", "accelerated_video", "difference_video", "result_json", "metrics",
                  "environment", "notes")
PAGE_OUTPUTS = ("headline", "metrics_html", "colour_bar", "latency_plot", "frame", "frame_view", "frame_plot", "code",
                "current_view")


def _page(view: ComparisonView | None, status: str = "") -> dict[str, object]:
    """Every result component's value for ``view`` (None: an empty result with ``status``). Its
    warnings and error are shown in the headline and the notes, never as toasts over the cards."""
    files = view.files if view is not None else {}
    notes = [] if view is None else [f"- {note}" for note in view.notes]
    if view is not None:
        notes[:0] = [f"**Warning:** {warning}" for warning in view.warnings]
        if view.error:
            notes.insert(0, f"**Error:** {view.error}")
    frame = _worst_frame(view)
    frames = len(view.frame_psnr) if view is not None else 0
    return {
        "side_by_side": files.get("side_by_side"),
        "baseline_video": files.get("baseline"),
        "accelerated_video": files.get("accelerated"),
        "difference_video": files.get("difference"),
        "result_json": files.get("json"),
        "metrics": pd.DataFrame([] if view is None else view.rows, columns=list(COLUMNS)),
        "environment": "" if view is None else f"<small>{view.environment}</small>",
        "notes": "\n".join(notes),
        "headline": cards_html(view, status),
        "metrics_html": "" if view is None else metrics_html(view.rows),
        "colour_bar": colour_bar_html(None if view is None else view.difference_max),
        "latency_plot": latency_chart(view),
        "frame": gr.Slider(minimum=0, maximum=max(frames - 1, 1), value=frame, interactive=frames > 1,
                           info=f"{frames} frames; the worst by PSNR is shown first" if frames else None),
        "frame_view": _frame_pair(view, frame),
        "frame_plot": frame_psnr_chart(view, frame),
        "code": "" if view is None else view.code,
        "current_view": None if view is None else dataclasses.asdict(view),
    }


def _view_from_state(value) -> ComparisonView | None:
    return ComparisonView.from_dict(value) if value else None


def _result_values(view: ComparisonView | None, status: str = "") -> tuple:
    """:func:`_page` in the order of the result components (Cancel, a past run, an example)."""
    page = _page(view, status)
    return tuple(page[name] for name in (*RESULT_OUTPUTS, *PAGE_OUTPUTS))


def on_frame(frame, current):
    """Another frame picked: the two images and the marker on the PSNR chart."""
    view = _view_from_state(current)
    try:
        index = int(frame)
    except (TypeError, ValueError):
        index = _worst_frame(view)
    return _frame_pair(view, index), frame_psnr_chart(view, index)


async def _run_form(values: dict, sweep: bool, history, progress):
    """Shared body of Run and Run sweep: form -> requests -> runs -> page outputs and history."""
    try:
        requests, source = plan(values, sweep)
    except RequestError as error:
        raise gr.Error(str(error), title="Invalid input") from None
    form = {name: value for name, value in values.items() if name in RUN_FIELDS}
    forms = [{name: value for name, value in point.items() if name in RUN_FIELDS} for point in sweep_forms(values)] \
        if sweep else [form]
    views = await _execute(requests, source, progress, forms)
    history = history_runs.record(history, views, LIMITS.history_rows,
                                  sweep_label(values.get(SWEEP_FIELD, "ratio")) if sweep else None)
    page = _page(views[-1])
    table, points, chart, runs = _history_outputs(history)
    return (*(page[name] for name in RESULT_OUTPUTS), history, table, points,
            *(page[name] for name in PAGE_OUTPUTS), chart, runs, result_data(views[-1]))


def result_data(view: ComparisonView):
    """The comparison's whole ``result.json`` as the API's JSON output (None if none was written)."""
    path = view.files.get("json")
    return json.loads(Path(path).read_text()) if path and Path(path).exists() else None


def _endpoint(name: str, fields: tuple[str, ...], sweep: bool, doc: str):
    """An event handler taking the form's ``fields`` by name (then the session's history): the
    form is declared once (vdtome.web.ui), so a new method adds parameters without editing this file.
    Gradio reads the parameter names (the API's) from the signature and passes every value; a
    Python caller may leave out the methods' fields (their defaults apply; any other missing value
    is refused naming its field)."""
    defaults = method_defaults(PRESETS[DEFAULT_PRESET]) | {CUSTOM_MODEL: ""}
    signature = inspect.Signature([
        *(inspect.Parameter(field, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults.get(field))
          for field in fields),
        inspect.Parameter("history", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()),
    ])

    async def handler(*arguments, **named):
        bound = signature.bind(*arguments, **named)
        given = set(bound.arguments)
        bound.apply_defaults()
        values = dict(bound.arguments)
        if values.get("preset") in PRESETS:  # a method field left out takes its default on the chosen model
            chosen = method_defaults(PRESETS[values["preset"]])
            values.update({field: chosen[field] for field in METHOD_FIELDS if field not in given and field in values})
        history, progress = values.pop("history"), values.pop("progress")
        return await _run_form(values, sweep, history, progress)

    handler.__signature__ = signature
    # Parameters added after token merging stood alone may be left out by clients (StrictBlocks).
    handler.optional_parameters = {field: defaults.get(field) for field in fields[appended_from(sweep):]}
    handler.__name__ = handler.__qualname__ = name
    handler.__doc__ = doc
    return handler


compare = _endpoint("compare", COMPARE_FIELDS, False,
                    "Baseline vs the chosen stack of methods on one prompt and seed: videos, metrics, history.")
sweep = _endpoint("sweep", SWEEP_FIELDS, True,
                  "One comparison per value of the swept field (the baseline video is made once and reused; every "
                  "point is timed against fresh baseline calls): the speedup/fidelity curve.")

# ---- the Benchmark tab: a sweep over prompts and seeds (vdtome.bench.runner), in the same GPU queue -------

BENCH_DIR = INSTANCE_DIR / "bench"
KEEP_BENCHES = 4  # benchmark folders kept on disk (rows, plots, report)
BENCH_FIELDS = ("bench_preset", "bench_prompts", "bench_seeds", "bench_sweep")
BENCH_PROMPTS = 3  # prompts the tab starts with (of the preset's set)
BENCH_SWEEP = "smoke"
BENCH_CANCELLED = "Cancel pressed: a running benchmark stops at its next denoising step and keeps nothing."


def bench_plan(values: dict) -> BenchPlan:
    """The Benchmark form -> a plan, every rule checked (:meth:`vdtome.web.gates.RequestGates.benchmark`)."""
    return GATES.benchmark(values)


def run_benchmark(plan: BenchPlan, folder: Path, cancel: CancelFlag, progress=gr.Progress()) -> BenchOutcome:
    """Every row of the plan on the shared engine, one after another; progress over rows."""
    worker = BenchWorker(engine=engine())
    total = len(plan.keys())
    state = {"done": 0}

    def on_step(event: ProgressEvent) -> None:
        within = event.done / max(event.total, 1)
        progress((state["done"] + within) / total, desc=f"row {state['done'] + 1}/{total} · {event.label}")

    def on_row(row: BenchRow, done: int, total_rows: int) -> None:
        state["done"] = done

    return run_bench(plan, folder, runner=lambda todo: run_serial(plan, todo, worker, progress=on_step, cancel=cancel),
                     show_progress=False, on_row=on_row, report=write_report)


def _bench_gpu_duration(plan: BenchPlan, folder: Path, cancel: CancelFlag, progress=None) -> int:
    return benchmark_duration(PRESETS[plan.preset], plan)


if ON_ZERO_GPU:
    run_benchmark = spaces.GPU(duration=_bench_gpu_duration)(run_benchmark)


async def benchmark(bench_preset, bench_prompts, bench_seeds, bench_sweep, progress=gr.Progress()):
    """Every setting of a sweep (YAML, see vdtome/data/presets/sweeps) on every prompt (one a line) and seed ("0,1"):
    the summary per setting, the plots and the report with every row."""
    values = dict(zip(BENCH_FIELDS, (bench_preset, bench_prompts, bench_seeds, bench_sweep)))
    try:
        plan = bench_plan(values)
    except RequestError as error:
        raise gr.Error(str(error), title="Invalid input") from None
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    prune(BENCH_DIR, KEEP_BENCHES - 1, LIMITS.outputs_mb * 2**20)
    folder = Path(tempfile.mkdtemp(prefix="bench-", dir=BENCH_DIR))
    remove = functools.partial(shutil.rmtree, folder, ignore_errors=True)
    outcome = await _cancellable("benchmark", lambda flag: run_benchmark(plan, folder, flag, progress=progress),
                                 discard=lambda _: remove(), cleanup=remove)
    return bench_outputs(outcome)


def bench_outputs(outcome: BenchOutcome) -> tuple:
    """Status, summary table, plots and files of a finished benchmark."""
    failed = sum(not row.ok for row in outcome.rows)
    front = ", ".join(s.setting for s in pareto_front(outcome.summaries)) or "none (no setting was faster)"
    busy = busy_sentence(outcome.rows)
    status = (f"**{len(outcome.rows) - failed} of {len(outcome.plan.keys())} rows finished**"
              f"{f', {failed} failed (see the report)' if failed else ''} · {outcome.plan.sweep.name} on "
              f"{outcome.plan.preset}. Speedups: the median over prompts and seeds, the range over them in brackets; "
              f"each row was timed against its own adjacent baseline calls. Pareto front (fastest first): {front}."
              + (f"\n\n**Warning:** {busy}" if busy else ""))
    table = pd.DataFrame([summary_cells(s) for s in outcome.summaries], columns=list(SUMMARY_HEADER))
    plots = [(path, title[len("plot: "):]) for title, path in outcome.files.items() if title.startswith("plot: ")]
    files = [outcome.files[name] for name in ("report", "summary", "rows") if name in outcome.files]
    # Each prompt's speed and fidelity under the summary, as the report lists them (a busy row says so).
    every_row = (f"<details open><summary>Every row: each prompt and seed ({len(outcome.rows)})</summary>"
                 f"{table_html(ROW_HEADER, [row_cells(row) for row in outcome.rows], 'bench-rows-table')}</details>")
    return status, table, plots, files, table_html(SUMMARY_HEADER, [summary_cells(x) for x in outcome.summaries],
                                                   "bench-summary-table") + every_row


def on_bench_preset(name: str) -> str:
    return "\n".join(preset_prompts(PRESETS[name])[:BENCH_PROMPTS]) if name in PRESETS else ""


def on_prompt_set(name: str) -> str:
    return "\n".join(load_prompts(name)) if name in prompt_sets() else ""


def on_shipped_sweep(name: str) -> str:
    path = shipped_sweeps().get(name)
    return path.read_text(encoding="utf-8") if path else ""


CANCELLED = ("Cancelled. The run stopped at its next denoising step and saved nothing; the previous result was "
             "cleared (its settings were not these). Run is available again once it has stopped.")


def cancel_requested():
    return _result_values(None, CANCELLED)


def restore_history(stored):
    """The history kept in this browser, when the page loads (a value of another shape is dropped)."""
    history = history_runs.checked(stored)
    return history, *_history_outputs(history), _chart_groups(history)


def clear_history():
    return [], [], *_history_outputs([]), _chart_groups([])


def history_csv(history):
    """The history table as a CSV file to download."""
    history = history_runs.checked(history)
    if not history:
        raise gr.Error("the history is empty: run a comparison first", title="Nothing to export")
    folder = INSTANCE_DIR / "exports"
    folder.mkdir(parents=True, exist_ok=True)
    prune(folder, 20, 50 * 2**20)
    path = Path(tempfile.mkdtemp(dir=folder)) / "vdtome-history.csv"
    pd.DataFrame(history_export(history)).to_csv(path, index=False)
    return gr.update(value=str(path), visible=True)


def show_run(run, history):
    """A past run of the history (a sweep's point included) shown again from its saved view."""
    path = history_runs.run_folder(history, run, engine().output_root)
    if path is None:
        raise gr.Error(f"the files of run {run} are gone: this server keeps its last {KEEP_OUTPUTS} comparisons, "
                       "and a restart clears them", title="Run not available")
    view = ComparisonView.load(path)
    return (*_result_values(view, f"Run {run} of your history · "), *_restored_form(view, f"run {run}"))


EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"


def example_choices() -> list[tuple[str, str]]:
    """(title, folder name) of every finished comparison shipped with the app."""
    if not EXAMPLES_DIR.is_dir():
        return []
    choices = []
    for folder in sorted(p for p in EXAMPLES_DIR.iterdir() if (p / VIEW_FILE).exists()):
        view = ComparisonView.load(folder)
        choices.append((f"{view.title} · {view.environment.split(' · ')[0]}", folder.name))
    return choices


def show_example(name):
    names = dict((value, label) for label, value in example_choices())
    if name not in names:
        raise gr.Error(f"no example named {shown(name)}", title="Example not found")
    view = ComparisonView.load(EXAMPLES_DIR / name)
    return (*_result_values(view, f"Example recorded earlier ({view.environment.split(' · ')[0]}): "),
            *_restored_form(view, "this example"))


def _restored_form(view: ComparisonView, what: str) -> tuple:
    """The form set to the settings of a shown run, so Run reproduces it; a view saved before
    runs kept their form leaves the form as it is, and says so."""
    if view.form is None:
        return (*_form_unchanged(), f"The settings of {what} were not recorded: the form is unchanged, so Run would "
                                    "not reproduce it.", *_titles(None))
    values = {name: value for name, value in view.form.items() if name in RUN_FIELDS}
    return _form_updates(values, [], f"The form now holds the settings of {what}: Run reproduces it.")


def load_recipe_choice(source):
    """The form set to a recipe (a shipped one's name or a tune's recipe.json), saying what it is."""
    try:
        recipe = load_recipe(source)
        values = recipe_form(recipe)
    except RequestError as error:
        return (*_form_unchanged(), f"**This recipe cannot be loaded:** {error}", *_titles(None))
    figures = recipe.figures_text()
    told = f"; validated at {figures}" if figures else ""
    return _form_updates(values, [], f"**Recipe {recipe.label()} loaded:** {recipe.stack_text()}, tuned at "
                                     f"{recipe.frames} frames of {recipe.height}x{recipe.width}, {recipe.steps} steps"
                                     f"{told}.")


def refresh_recipes():
    return gr.Dropdown(choices=tuned_recipes(TUNE_DIR))


def share_link(*values):
    """The query string that restores the form (the page adds its own address)."""
    return settings_query(dict(zip(COMPARE_FIELDS, values)))


def _frames_info(rules) -> str:
    return f"{rules.frames_rule}, {rules.valid_frame_range[0]}-{rules.valid_frame_range[1]}"


def _side_info(rules) -> str:
    return f"multiple of {rules.side_multiple}, {rules.valid_side_range[0]}-{rules.valid_side_range[1]}"


def _negative_prompt_box(preset, value: str = "") -> gr.Textbox:
    if preset.negative_prompt_unsupported:
        return gr.Textbox(value="", interactive=False, info=f"Not used by this model: {preset.negative_prompt_unsupported}.")
    return gr.Textbox(value=value, interactive=True, info=None)


ROUNDS_INFO = f"1-{MAX_ROUNDS} back-to-back pairs; 6+ give a verdict"
GPU_POINTER = ("To run it: duplicate this Space with GPU hardware (Settings → Duplicate this Space), or on a GPU "
               "machine run `python -m vdtome compare --preset {name} --prompt \"...\"`.")


def run_notice(preset) -> tuple[dict, dict, str]:
    """Run and Run sweep, usable only where the preset can run; else the reason and the way."""
    if preset.requires_gpu and not HAS_GPU:
        why = (f"**{preset.label} cannot run here: this machine has no GPU.** " + GPU_POINTER.format(name=preset.name))
        return gr.update(interactive=False), gr.update(interactive=False), why
    return gr.update(interactive=True), gr.update(interactive=True), ""


def _examples_label(preset) -> str:
    if preset.prompts:
        return f"Prompts {preset.name} knows (vdtome/data/presets/prompts/{preset.prompts}.txt)"
    return "Example prompts"


def on_preset_prompts(name: str):
    """The example prompts follow the preset: a trained tiny model knows only its own prompts."""
    preset = PRESETS[name]
    return gr.Dataset(samples=[[p] for p in preset_prompts(preset)], label=_examples_label(preset))


def on_preset_recipes(name: str) -> str:
    return shipped_recipe_note(PRESETS[name])


def on_preset(name: str, negative_prompt: str):
    preset = PRESETS[name]
    rules = preset.constraints
    return (
        preset_line(preset, HAS_GPU),
        preset_info(preset, HAS_GPU),
        _negative_prompt_box(preset, negative_prompt),
        gr.Number(value=preset.num_frames, info=_frames_info(rules)),
        gr.Number(value=preset.height, info=_side_info(rules)),
        gr.Number(value=preset.width, info=_side_info(rules)),
        gr.Number(value=preset.num_inference_steps),
        gr.Number(value=preset.guidance_scale),
        gr.Number(value=preset.timing_rounds),
        *run_notice(preset),
    )


def _unavailable(preset) -> dict[str, str | None]:
    """Why each method cannot serve a preset's denoiser (None where it can)."""
    types = pipeline_denoiser_types(preset.pipeline_class)
    return {name: method.unavailable(types) for name, method in METHODS.items()}


def _switch(method, reason: str | None, value: bool | None = None) -> dict:
    """A method's on/off switch: off and locked, with the reason, where the model cannot take it."""
    if reason:
        return dict(value=False, interactive=False, info=f"Unavailable for this model: {reason}")
    return dict(value=method.on_by_default if value is None else value, interactive=True, info=method.docs)


def on_preset_methods(name: str, *switches: bool):
    """Another preset: the switches it cannot take locked off, the methods' fields at its defaults
    (token merging's are chosen per model), and the titles of the form that results."""
    reasons = _unavailable(PRESETS[name])
    states = [_switch(method, reasons[key], value) for (key, method), value in zip(METHODS.items(), switches)]
    defaults = method_defaults(PRESETS[name])
    form = defaults | {method.enable_field: state["value"] for method, state in zip(METHODS.values(), states)}
    return (*(gr.Checkbox(**state) for state in states),
            *(gr.update(value=widget_value(defaults[field])) for field in METHOD_FIELDS), *_titles(form))


# Every method field, in registry order (the outputs of on_preset_fields).
METHOD_FIELDS = tuple(f.name for method in METHODS.values() for f in method.fields)


def restore_from_link(request: gr.Request):
    """Form values from the page address's query string (a shared link); what cannot be used is
    named in the notice, never silently changed."""
    params = dict(request.query_params) if request is not None else {}
    if not params:  # no link: the form stays as built (a visitor may already be typing)
        return (*_form_unchanged(), gr.update(), *_titles(None))
    values, problems = settings_from_query(params)
    notice = "" if not problems else "**This link had settings the form cannot take; they were left as they were:** " + \
        "; ".join(problems)
    return _form_updates(values, problems, notice)


def _form_unchanged() -> list:
    """No change to the form outputs but the notice: the fields, the switches, the two preset notes, Run, Run sweep."""
    return [gr.update()] * (len(LINK_FIELDS) + len(METHODS) + 4)


def _form_updates(values: dict, problems: list[str], notice: str) -> tuple:
    """Updates of the form to ``values``, in the order of the form outputs: the fields of
    :data:`LINK_FIELDS`, the switches (locked where the preset cannot take a method), the preset's
    notes, Run, Run sweep, the notice and the titles. A field ``values`` leaves out keeps its value:
    the new preset's default, or on a page just opened, the default preset's."""
    preset, targets = form_targets(values, problems, PRESETS, DEFAULT_PRESET, LINK_FIELDS)
    updates = [gr.update(value=targets[field]) if field in targets else gr.update() for field in LINK_FIELDS]
    reasons = _unavailable(preset)
    states = [_switch(method, reasons[key], values.get(method.enable_field)) for key, method in METHODS.items()]
    form = method_defaults(preset) | targets | {method.enable_field: state["value"]
                                                for method, state in zip(METHODS.values(), states)}
    if problems and not notice:
        notice = "**Some settings could not be restored:** " + "; ".join(problems)
    run_button, sweep_button, gpu_notice = run_notice(preset)
    return (*updates, *(gr.Checkbox(**state) for state in states), preset_line(preset, HAS_GPU),
            preset_info(preset, HAS_GPU), run_button, sweep_button,
            "\n\n".join(x for x in (gpu_notice, notice) if x), *_titles(form))


def check_form(*values):
    """What Run would be refused for, shown at the Run button with a link to the field (the
    validator's message sits under the field, which may be far up the page)."""
    return _check(dict(zip(COMPARE_FIELDS, values)), sweep=False)


def check_sweep(*values):
    """The same for Run sweep."""
    return _check(dict(zip(SWEEP_FIELDS, values)), sweep=True)


def _check(fields: dict, sweep: bool) -> str:
    try:
        plan(fields, sweep)
    except RequestError as error:
        return _refusal(error)
    return ""


def _refusal(error: RequestError) -> str:
    """The refusal with a link to its field: its label, and the folded groups that hold it."""
    name = error.field
    for key, method in METHODS.items():
        if name == method.enable_field:
            return refusal_html(str(error), name, f"Use {method.label}", ["acceleration", f"method-{key}"])
        for form_field in method.fields:
            if form_field.name == name:
                panels = ["acceleration", f"method-{key}"] + ([f"method-{key}-more"] if form_field.advanced else [])
                return refusal_html(str(error), name, f"{method.label}: {form_field.label}", panels)
    return refusal_html(str(error), FIELD_ELEMENTS.get(name, name or "prompt"), REQUEST_LABELS.get(name, "the form"), [])


# Labels of the request's own fields (a refusal's link names them); elements whose id is not the
# field's name.
REQUEST_LABELS = {"preset": "Model preset", "prompt": "Prompt", "negative_prompt": "Negative prompt", "seed": "Seed",
                  "frames": "Frames", "height": "Height", "width": "Width", "steps": "Steps", "guidance": "Guidance",
                  "rounds": "Timing rounds", CUSTOM_MODEL: "Custom weights", SWEEP_VALUES: "Sweep values",
                  SWEEP_FIELD: "Sweep over"}
FIELD_ELEMENTS = {SWEEP_VALUES: "sweep-ratios"}


def _widget(form_field: FormField, defaults: dict):
    """The Gradio input for a method's field (elem_id = its API name) at its value in ``defaults``
    (the default preset's). A field whose valid range depends on other fields starts at their bound."""
    common = dict(label=form_field.label, info=form_field.help or None, elem_id=form_field.name)
    value = defaults[form_field.name]
    if form_field.kind in ("number", "integer"):
        bound = field_bound(form_field, defaults)
        if bound is not None:
            common["info"] = f"{form_field.help}; {bound[1]}"
        return gr.Slider(form_field.minimum, form_field.maximum if bound is None else bound[0],
                         value=value, step=form_field.step or (1 if form_field.kind == "integer" else None), **common)
    if form_field.kind == "boolean":
        return gr.Checkbox(value=value, **common)
    if form_field.kind == "choice":
        return gr.Radio(list(form_field.options), value=value, **common)
    if form_field.kind == "text":  # its options are suggestions (shipped schedules): any text is taken
        if form_field.options:
            return gr.Dropdown(list(dict.fromkeys((value, *form_field.options))), value=value, allow_custom_value=True,
                               **common)
        return gr.Textbox(value=value, max_lines=1, **common)
    return gr.CheckboxGroup(list(form_field.options), value=list(value), **common)


def on_bound(form_field: FormField, value, *others):
    """A field's slider follows the bound the other fields set (the stride's cap of the merge
    ratio); a value already above it is kept and named, never moved: Run would refuse it."""
    bound = field_bound(form_field, dict(zip(form_field.bound_by, others)))
    if bound is None:
        return gr.update()
    limit, rule = bound
    if isinstance(value, (int, float)) and value > limit + 1e-9:
        return gr.update(maximum=value, info=f"{form_field.help}; {rule}: {value:g} is above it, Run would refuse it")
    return gr.update(maximum=limit, info=f"{form_field.help}; {rule}")


# Every method's switch and fields, in registry order: the inputs of a title update.
METHOD_INPUTS = tuple(name for method in METHODS.values()
                      for name in (method.enable_field, *(f.name for f in method.fields)))


def on_titles(*values):
    """Every method's group title and the Acceleration section's, after a visitor changed a method input."""
    return _titles(dict(zip(METHOD_INPUTS, values)))


def _titles(form: dict | None) -> tuple:
    """Updates of every method's group title and the Acceleration section's for ``form`` (None: unchanged)."""
    if form is None:
        return (gr.update(),) * (len(METHODS) + 1)
    return (*(gr.update(label=panel_title(method, form)) for method in METHODS.values()),
            gr.update(label=acceleration_title(form)))


def _starting_methods(preset) -> dict:
    """The methods' switches and fields as the form starts on ``preset`` (a method it cannot take is off)."""
    reasons = _unavailable(preset)
    return method_defaults(preset) | {method.enable_field: method.on_by_default and not reasons[name]
                                      for name, method in METHODS.items()}


def method_panel(preset) -> tuple[dict[str, gr.components.Component], list[gr.Checkbox], dict[str, gr.Accordion]]:
    """One group per registered method, titled with whether it is on and its settings: its
    switch, its fields, the advanced ones folded."""
    widgets: dict[str, gr.components.Component] = {}
    switches = []
    panels = {}
    reasons = _unavailable(preset)
    starting = _starting_methods(preset)
    defaults = method_defaults(preset)
    for name, method in METHODS.items():
        title = panel_title(method, starting)
        with gr.Accordion(title, open=method.on_by_default, elem_id=f"method-{name}") as panels[name]:
            switch = gr.Checkbox(label=f"Use {method.label}", elem_id=method.enable_field,
                                 **_switch(method, reasons[name]))
            widgets[method.enable_field] = switch
            switches.append(switch)
            for form_field in method.fields:
                if not form_field.advanced:
                    widgets[form_field.name] = _widget(form_field, defaults)
            advanced = [f for f in method.fields if f.advanced]
            if advanced:
                with gr.Accordion("More options", open=False, elem_id=f"method-{name}-more"):
                    for form_field in advanced:
                        widgets[form_field.name] = _widget(form_field, defaults)
    return widgets, switches, panels


# The fields a shared link restores (the switches travel separately: they lock per preset).
LINK_FIELDS = tuple(name for name in COMPARE_FIELDS if name not in {m.enable_field for m in METHODS.values()}
                    and name != CUSTOM_MODEL)

# After Run: the headline cards into view (on a narrow screen the result is below the form).
# (an event's js receives its inputs and must hand them on)
SCROLL_TO_RESULT = ("(...values) => { document.getElementById('result-column')?.scrollIntoView({behavior: 'instant', "
                    "block: 'start'}); return values; }")
SCROLL_TO_CARDS = "() => { document.getElementById('headline')?.scrollIntoView({behavior: 'instant', block: 'nearest'}); }"
# A past run or an example shown: its result is at the top of the page, far from the pickers.
SCROLL_TO_HEADLINE = ("() => { document.getElementById('result-column')?.scrollIntoView({behavior: 'instant', "
                      "block: 'start'}); }")
# The refusal box's links: open the folded groups that hold the field (a folded group's fields are
# not in the page until it opens), then scroll to the field and focus it.
FIELD_LINKS = """
element.addEventListener('click', async (event) => {
  const link = event.target.closest('a[data-field]');
  if (!link) return;
  event.preventDefault();
  const settle = () => new Promise((done) => setTimeout(done, 60));
  for (const id of (link.dataset.panels || '').split(' ').filter(Boolean)) {
    const toggle = document.getElementById(id)?.querySelector(':scope > button.label-wrap');
    if (toggle && !toggle.classList.contains('open')) { toggle.click(); await settle(); }
  }
  let target = null;
  for (let tries = 0; tries < 20 && !target; tries++) {
    target = document.getElementById(link.dataset.field);
    if (!target) await settle();
  }
  if (!target) return;
  target.scrollIntoView({behavior: 'instant', block: 'center'});
  target.querySelector('input, textarea')?.focus({preventScroll: true});
});
"""
FULL_LINK = ("(query) => { const link = window.location.origin + window.location.pathname + query; "
             "navigator.clipboard?.writeText(link).catch(() => {}); return link; }")


# ---- layout --------------------------------------------------------------------------------------


def build_demo() -> gr.Blocks:
    preset = PRESETS[DEFAULT_PRESET]
    rules = preset.constraints
    with StrictBlocks(title="vdtome: training-free acceleration for video diffusion", delete_cache=(900, 3600)) as demo:
        gr.Markdown(
            "# vdtome\nTraining-free acceleration for video diffusion transformers against the baseline on the "
            "same prompt and seed, timed in one request with an interval; within noise is said so.",
            elem_id="vdtome-title",
        )
        # The session's runs: worked on in gr.State (no API value: an API call starts from an empty
        # history), kept in the browser's localStorage after every change, so a reload keeps them.
        history = gr.State([])
        stored_history = gr.BrowserState([], storage_key="vdtome-history")
        current_view = gr.State(None)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=340, elem_id="form-column"):
                model = gr.Dropdown(
                    [(preset_choice_label(p, HAS_GPU), p.name) for p in PRESETS.values()],
                    value=preset.name, label="Model preset", elem_id="preset",
                )
                model_info = gr.Markdown(preset_line(preset, HAS_GPU), elem_id="preset-line")
                with gr.Accordion("About this model", open=False, elem_id="preset-details"):
                    model_details = gr.Markdown(preset_info(preset, HAS_GPU))
                custom_model = gr.Textbox(
                    label="Custom weights (hub id or local folder, loaded with the preset's pipeline class)",
                    value="", visible=custom_models_allowed(), max_lines=1, elem_id=CUSTOM_MODEL,
                )
                prompts = preset_prompts(preset)
                prompt = gr.Textbox(label="Prompt", value=prompts[0], lines=2, max_lines=6, elem_id="prompt")
                prompt_examples = gr.Examples([[p] for p in prompts], inputs=[prompt], examples_per_page=4,
                                              label=_examples_label(preset))
                negative = gr.Textbox(label="Negative prompt", value="", max_lines=2, elem_id="negative_prompt",
                                      interactive=not preset.negative_prompt_unsupported)
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed", min_width=80)
                    frames = gr.Number(label="Frames", value=preset.num_frames, precision=0,
                                       info=_frames_info(rules), min_width=80, elem_id="frames")
                    height = gr.Number(label="Height", value=preset.height, precision=0,
                                       info=_side_info(rules), min_width=80, elem_id="height")
                    width = gr.Number(label="Width", value=preset.width, precision=0,
                                      info=_side_info(rules), min_width=80, elem_id="width")
                with gr.Row():
                    steps = gr.Number(label="Steps", value=preset.num_inference_steps, precision=0, min_width=80,
                                      elem_id="steps")
                    guidance = gr.Number(label="Guidance", value=preset.guidance_scale, min_width=80, elem_id="guidance")
                    # No precision: the engine refuses 2.5 with the rule instead of the page rounding it.
                    rounds = gr.Number(label="Timing rounds", value=preset.timing_rounds, step=1,
                                       info=ROUNDS_INFO, elem_id="rounds", min_width=80)
                # Folded: a phone reaches Run past one line, which says what is on.
                with gr.Accordion(acceleration_title(_starting_methods(preset)), open=False,
                                  elem_id="acceleration") as acceleration:
                    recipe_pick = gr.Dropdown(tuned_recipes(TUNE_DIR), value=None, label="Load a tuned recipe",
                                              info="the stack a tune chose, at the size and steps it was tuned at",
                                              elem_id="recipe-pick")
                    recipe_note = gr.Markdown(shipped_recipe_note(preset), elem_id="recipe-note")
                    gr.Markdown("Switch on any methods to stack them (applied in this order).")
                    method_widgets, switches, panels = method_panel(preset)
                with gr.Accordion("Share and reproduce", open=False, elem_id="share"):
                    share_button = gr.Button("Link to these settings (copied to the clipboard)", size="sm",
                                             elem_id="share-button")
                    share_query = gr.Textbox(visible=False)
                    share_box = gr.Textbox(label="Link", interactive=False, buttons=["copy"], elem_id="share-link")
                    code = gr.Code(label="The library call that reproduces the result shown", language="python",
                                   interactive=False, elem_id="code")
            with gr.Column(scale=7, min_width=340, elem_id="result-column"):
                # On a phone, a bar fixed at the bottom of the screen (CSS): Run from anywhere in the form,
                # and what it was refused for where the visitor looks.
                with gr.Column(elem_id="run-bar"):
                    with gr.Row():
                        run = gr.Button("Run comparison", variant="primary", elem_id="run", scale=3)
                        stop = gr.Button("Cancel", variant="stop", elem_id="cancel", scale=1)
                    # What Run was refused for, with a link that opens and scrolls to the field.
                    refusal = gr.HTML("", elem_id="refusal-box", js_on_load=FIELD_LINKS)
                notice = gr.Markdown(run_notice(preset)[2], elem_id="run-notice")
                headline = gr.HTML(cards_html(None), label="headline", elem_id="headline-box", min_height=90)
                side_by_side = gr.Video(label="side by side", show_label=False, autoplay=True, loop=True, buttons=["download"],
                                        elem_id="side-by-side", height=360)
                with gr.Tab("Frame by frame"):
                    frame = gr.Slider(0, 1, value=0, step=1, label="Frame", elem_id="frame-picker")
                    frame_view = gr.ImageSlider(label="baseline (left) | accelerated (right): drag to compare",
                                                type="filepath", elem_id="frame-slider", max_height=360,
                                                interactive=False)
                    frame_plot = gr.Plot(label="PSNR per frame", show_label=False, elem_id="frame-psnr")
                with gr.Tab("Each video"):
                    with gr.Row():
                        baseline_video = gr.Video(label="baseline", loop=True, buttons=["download"],
                                                  elem_id="baseline-video", height=220, min_width=120)
                        accelerated_video = gr.Video(label="accelerated", loop=True, buttons=["download"],
                                                     elem_id="accelerated-video", height=220, min_width=120)
                        difference_video = gr.Video(label="difference (heat map)", loop=True, buttons=["download"],
                                                    elem_id="difference-video", height=220, min_width=120)
                    colour_bar = gr.HTML(label="colour bar", elem_id="colour-bar-box")
                with gr.Tab("Latency"):
                    latency_plot = gr.Plot(label="latency by phase", show_label=False, elem_id="latency-plot")
                metrics_view = gr.HTML(label="metrics table", elem_id="metrics-box")
                # The same rows as a Dataframe: the API's value since the first version (hidden here).
                metrics = gr.Dataframe(headers=list(COLUMNS), label="Metrics", interactive=False, visible=False,
                                       column_count=len(COLUMNS), elem_id="metrics-table")
                environment = gr.Markdown(elem_id="environment", label="environment")
                notes = gr.Markdown(elem_id="notes", label="notes")
                result_json = gr.File(label="All figures (JSON)", elem_id="result-json")
                # The API's machine-readable result: result.json's content (appended last to the outputs).
                result_data_output = gr.JSON(label="result", visible=False, elem_id="result-data")
        with gr.Tab("History", elem_id="history-tab"):
            gr.Markdown("This session's runs, kept in this browser (a reload keeps them).")
            chart_group = gr.Dropdown([], label="Chart the runs of (only one model and size compare)",
                                      elem_id="chart-group")
            history_chart_plot = gr.Plot(label="history chart", show_label=False, elem_id="history-chart")
            # The chart's points as the API returned them before the chart above (hidden here).
            history_points = gr.ScatterPlot(x="PSNR vs baseline (dB)", y=PLOT_SPEEDUP, visible=False,
                                            label="history points", elem_id="history-plot")
            history_table = gr.Dataframe(headers=list(HISTORY_COLUMNS), label="Runs", interactive=False,
                                         elem_id="history-table", column_count=len(HISTORY_COLUMNS), max_height=600)
            with gr.Row():
                run_picker = gr.Dropdown([], label="Show a past run (a sweep's points too)", elem_id="run-picker",
                                         scale=3)
                export_button = gr.Button("Export CSV", scale=1, elem_id="export-csv")
                clear_button = gr.Button("Clear history", scale=1)
            export_file = gr.File(label="History (CSV)", visible=False, elem_id="history-csv")
            with gr.Row():
                sweep_field = gr.Dropdown(sweep_choices(), value=sweep_choices()[0][1], label="Sweep over", scale=2,
                                          elem_id=SWEEP_FIELD)
                sweep_values = gr.Textbox(label="Sweep values", value=sweep_suggestion(sweep_choices()[0][1]),
                                          max_lines=1, scale=3, elem_id="sweep-ratios")
                sweep_button = gr.Button("Run sweep", scale=1, elem_id="sweep")
        with gr.Tab("Benchmark", elem_id="benchmark-tab"):
            gr.Markdown("Every setting of a sweep on every prompt and seed: one comparison per row, the summary per "
                        "setting, plots and an HTML report. The same runs from the command line, resumable and on "
                        "Ray: `python -m vdtome bench` (README).")
            with gr.Row(equal_height=False):
                with gr.Column(scale=5, min_width=320):
                    bench_preset = gr.Dropdown([(preset_choice_label(p, HAS_GPU), p.name) for p in PRESETS.values()],
                                               value=preset.name, label="Model preset", elem_id="bench_preset")
                    prompt_set = gr.Dropdown(prompt_sets(), value=None, label="Fill the prompts from a set",
                                             elem_id="prompt-set")
                    bench_prompts = gr.Textbox(label="Prompts (one a line)", value=on_bench_preset(preset.name),
                                               lines=4, max_lines=12, elem_id="bench_prompts")
                    bench_seeds = gr.Textbox(label="Seeds", value="0", info="e.g. 0,1,2 or 0-3", max_lines=1,
                                             elem_id="bench_seeds")
                    shipped = gr.Dropdown(list(shipped_sweeps()), value=BENCH_SWEEP, label="Start from a shipped sweep",
                                          elem_id="shipped-sweep")
                    bench_sweep = gr.Code(on_shipped_sweep(BENCH_SWEEP), language="yaml", interactive=True,
                                          label="Sweep (YAML: stacks of method fields; a list is a grid axis)",
                                          elem_id="bench_sweep")
                with gr.Column(scale=7, min_width=320):
                    with gr.Row():
                        bench_button = gr.Button("Run benchmark", variant="primary", elem_id="bench-run", scale=3)
                        bench_stop = gr.Button("Cancel", variant="stop", elem_id="bench-cancel", scale=1)
                    bench_status = gr.Markdown(elem_id="bench-status")
                    bench_summary_view = gr.HTML(elem_id="bench-summary-box")
                    # The same rows as a Dataframe: the API's value (hidden here; the HTML wraps on a phone).
                    bench_summary = gr.Dataframe(headers=list(SUMMARY_HEADER), label="Summary per setting",
                                                 interactive=False, visible=False, elem_id="bench-summary")
                    bench_plots = gr.Gallery(label="Plots (click one to enlarge)", columns=2, rows=2, height=720,
                                             object_fit="contain", preview=False, elem_id="bench-plots")
                    bench_files = gr.File(label="Report (HTML, self-contained), summary (CSV), every row (JSONL)",
                                          file_count="multiple", elem_id="bench-files")
        with gr.Tab("Tune", elem_id="tune-tab"):
            tune_tab = build_tune_tab(TuneTabContext(GATES, PRESETS, engine, TUNE_DIR, GPU_QUEUE, CANCEL_FLAGS,
                                                     HAS_GPU), preset)
        with gr.Tab("Examples", elem_id="examples-tab"):
            examples = example_choices()
            gr.Markdown("Comparisons recorded earlier with this app, shown instantly with the hardware they ran on "
                        "(the first line of each environment).")
            example_picker = gr.Dropdown(examples, value=None, label="Show an example", elem_id="example-picker")

        components = {"preset": model, "prompt": prompt, "negative_prompt": negative, "seed": seed, "frames": frames,
                      "height": height, "width": width, "steps": steps, "guidance": guidance, "rounds": rounds,
                      CUSTOM_MODEL: custom_model, SWEEP_VALUES: sweep_values, SWEEP_FIELD: sweep_field,
                      **method_widgets}
        by_name = {"side_by_side": side_by_side, "baseline_video": baseline_video,
                   "accelerated_video": accelerated_video, "difference_video": difference_video,
                   "result_json": result_json, "metrics": metrics, "environment": environment, "notes": notes,
                   "headline": headline, "metrics_html": metrics_view, "colour_bar": colour_bar,
                   "latency_plot": latency_plot, "frame": frame, "frame_view": frame_view, "frame_plot": frame_plot,
                   "code": code, "current_view": current_view}
        result_outputs = [by_name[name] for name in (*RESULT_OUTPUTS, *PAGE_OUTPUTS)]
        shown = [*(by_name[name] for name in RESULT_OUTPUTS), history, history_table, history_points,
                 *(by_name[name] for name in PAGE_OUTPUTS), history_chart_plot, run_picker, result_data_output]
        # Values reach the handlers as the client sent them (preprocess=False): Gradio would round
        # 1.5 to 2 and read "false" as true; the validator refuses them, naming the field, before
        # the request takes a queue place. One progress display: over the headline cards.
        generation = dict(concurrency_id=GPU_QUEUE, concurrency_limit=1, preprocess=False,
                          show_progress_on=[headline])
        private = dict(api_visibility="private")
        # What Run is refused for, at the Run button: registered before the run (the page sends a
        # click's events in order and stops at a refused one); its own quick queue, never behind a
        # generation; values as sent, as the validator sees them.
        checks = dict(preprocess=False, show_progress="hidden", concurrency_id="form-check", concurrency_limit=4,
                      **private)
        run.click(check_form, [components[name] for name in COMPARE_FIELDS], refusal, **checks)
        run_event = run.click(compare, [*(components[name] for name in COMPARE_FIELDS), history], shown,
                              api_name="compare", validator=validator((*COMPARE_FIELDS, "history"), sweep=False),
                              js=SCROLL_TO_RESULT, **generation)
        run_event.success(None, js=SCROLL_TO_CARDS)
        history_outputs = [history_table, history_points, history_chart_plot, run_picker, chart_group]
        keep = dict(fn=keep_history, inputs=[history, stored_history],
                    outputs=[history, stored_history, *history_outputs], api_visibility="private",
                    show_progress="hidden")
        run_event.then(**keep)
        sweep_button.click(check_sweep, [components[name] for name in SWEEP_FIELDS], refusal, **checks)
        sweep_event = sweep_button.click(sweep, [*(components[name] for name in SWEEP_FIELDS), history], shown,
                                         api_name="sweep", validator=validator((*SWEEP_FIELDS, "history"), sweep=True),
                                         js=SCROLL_TO_RESULT, **generation)
        sweep_event.success(None, js=SCROLL_TO_CARDS)
        sweep_event.then(**keep)
        bench_inputs = [bench_preset, bench_prompts, bench_seeds, bench_sweep]
        bench_event = bench_button.click(
            benchmark, bench_inputs, [bench_status, bench_summary, bench_plots, bench_files, bench_summary_view],
            api_name="benchmark", validator=field_validator(BENCH_FIELDS, bench_plan), concurrency_id=GPU_QUEUE,
            concurrency_limit=1, preprocess=False, show_progress_on=[bench_status])
        bench_stop.click(lambda: BENCH_CANCELLED, None, bench_status, cancels=[bench_event], queue=False, **private)
        bench_preset.input(on_bench_preset, bench_preset, bench_prompts, **private)
        prompt_set.input(on_prompt_set, prompt_set, bench_prompts, **private)
        shipped.input(on_shipped_sweep, shipped, bench_sweep, **private)
        # Gradio cancels the events' tasks; run_until_abandoned turns that into the engine's stop.
        stop.click(cancel_requested, None, result_outputs, cancels=[run_event, sweep_event], queue=False, **private)
        frame.release(on_frame, [frame, current_view], [frame_view, frame_plot], **private)
        clear_button.click(clear_history, None, [history, stored_history, *history_outputs], **private)
        export_button.click(history_csv, history, export_file, **private)
        form_outputs = [*(components[name] for name in LINK_FIELDS), *switches, model_info, model_details, run,
                        sweep_button, notice, *panels.values(), acceleration]
        # A shown run or example: its result into view, the example prompts of its preset.
        for picker, shower, inputs in ((run_picker, show_run, [run_picker, history]),
                                       (example_picker, show_example, [example_picker])):
            shown_event = picker.input(shower, inputs, [*result_outputs, *form_outputs], **private)
            shown_event.success(None, js=SCROLL_TO_HEADLINE)
            shown_event.success(on_preset_prompts, model, prompt_examples.dataset, show_progress="hidden", **private)
        # Each method's title says whether it is on and its settings; a bounded slider follows its bound.
        # Values as typed (preprocess=False): a value outside a slider's range is named in the title.
        # A visitor's edit (.input): one event for every title, run again after a burst of edits with the values
        # as they stand then. What changes many inputs at once (a link, a past run, another preset) sets the
        # titles itself from the values it sets: the page applies such an update input by input, and a
        # title read from it halfway (folded groups' fields come last) would stay wrong.
        everything = [method_widgets[name] for name in METHOD_INPUTS]
        titles = [*panels.values(), acceleration]
        edits = [widget.input for widget in everything] + [w.release for w in everything if isinstance(w, gr.Slider)]
        gr.on(edits, on_titles, everything, titles, show_progress="hidden",
              preprocess=False, trigger_mode="always_last", **private)
        for name, method in METHODS.items():
            for form_field in method.fields:
                if form_field.bound is not None:
                    others = [method_widgets[other] for other in form_field.bound_by]
                    for other in others:
                        other.change(functools.partial(on_bound, form_field), [method_widgets[form_field.name], *others],
                                     method_widgets[form_field.name], show_progress="hidden", preprocess=False,
                                     **private)
        # A recipe (picked, or the tune just finished) sets the form: preset, size, steps and its stack.
        for loaded in (recipe_pick.input(load_recipe_choice, recipe_pick, form_outputs, **private),
                       tune_tab.load.click(load_recipe_choice, tune_tab.recipe, form_outputs, **private)):
            loaded.success(on_preset_prompts, model, prompt_examples.dataset, show_progress="hidden", **private)
        tune_tab.load.click(refresh_recipes, None, recipe_pick, **private)
        share_button.click(share_link, [components[name] for name in COMPARE_FIELDS], share_query, **private).then(
            None, share_query, share_box, js=FULL_LINK)
        # .input, not .change: a link restoring a preset and its sizes must not be overwritten.
        model.input(on_preset, [model, negative], [model_info, model_details, negative, frames, height, width, steps,
                                                   guidance, rounds, run, sweep_button, notice], **private)
        model.input(on_preset_methods, [model, *switches],
                    [*switches, *(method_widgets[field] for field in METHOD_FIELDS), *titles], **private)
        model.input(on_preset_prompts, model, prompt_examples.dataset, **private)
        # .change: a recipe, a link or a shown run may set the preset too.
        model.change(on_preset_recipes, model, recipe_note, show_progress="hidden", **private)
        sweep_field.change(sweep_suggestion, sweep_field, sweep_values, **private)
        demo.load(restore_from_link, None, form_outputs, show_progress="hidden", **private).then(
            on_preset_prompts, model, prompt_examples.dataset, show_progress="hidden", **private)
        demo.load(restore_history, stored_history, [history, *history_outputs], show_progress="hidden", **private)
        chart_group.input(on_chart_group, [chart_group, history], history_chart_plot, show_progress="hidden", **private)
    # api_open=False: the direct routes (/gradio_api/run/compare, /run/predict) would skip the queue,
    # its limits and the validator; generation runs only through the queue.
    demo.queue(max_size=LIMITS.queue_size, default_concurrency_limit=1, api_open=False)
    limit_visitors(demo, GPU_QUEUE, LIMITS.queue_per_session, LIMITS.queue_per_address)
    expire_sessions(demo, LIMITS.session_ttl_s, LIMITS.session_grace_s)  # a visitor's state goes when they leave
    return demo


demo = build_demo()

def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # Gradio closes the server; then the instance folder is removed at exit


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    demo.launch(
        css=CSS, js=PAGE_SCRIPT, theme=gr.themes.Soft(), footer_links=["api", "gradio"],
        allowed_paths=[str(EXAMPLES_DIR)],  # the shipped examples' videos and frames
        max_file_size="1kb",  # the app takes no files; ServiceGuard refuses the upload route outright
        state_session_capacity=LIMITS.sessions_max,  # sessions whose state is kept (oldest dropped first)
        app_kwargs={"middleware": [Middleware(ServiceGuard, api_parameters=demo.api_parameters),
                                   demo.session_reaper.middleware()]},  # it sees tabs close
    )
