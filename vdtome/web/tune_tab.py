"""The page's Tune tab: ``python -m vdtome tune`` from the browser (:mod:`vdtome.bench.tune`).

A tune runs in the generation queue like a comparison (it counts against the same work limit and
its minutes are capped by the operator: ``VDTOME_TUNE_MINUTES``); its progress streams to the tab
as trials finish (trials run, minutes left, the front growing on the plot). Cancel stops it within
a denoising step and keeps the finished trials; a finished tune offers its recipe, its report and
"Load into the form". The UI only renders and wires: the rules are in
:meth:`vdtome.web.gates.RequestGates.tune`, the search in :class:`vdtome.bench.tune.Tuner`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import queue
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from vdtome.core.presets import ModelPreset
from vdtome.core.validation import RequestError
from vdtome.engine.storage import prune
from vdtome.web.cancel import CancelFlags
from vdtome.web.serving import wait_out

TUNE_FIELDS = ("tune_preset", "tune_floors", "tune_methods", "tune_minutes", "tune_require")
KEEP_TUNES = 8  # finished tunes kept on the server (their recipes are offered to the compare form)
POLL_S = 0.5


@dataclass(frozen=True)
class TuneTabContext:
    """What the tab needs of the app: its rules, presets, the shared engine, where tunes are kept,
    the generation queue's id and the cancel flags (files: seen by a forked GPU worker too)."""

    gates: Any
    presets: Mapping[str, ModelPreset]
    engine: Callable[[], Any]
    folder: Path
    queue_id: str
    flags: CancelFlags
    has_gpu: bool


@dataclass(frozen=True)
class TuneTab:
    """The tab's components the app wires beyond the tab (the recipe "Load into the form" fills)."""

    load: gr.Button
    recipe: gr.State


# The running tune of each browser session, for its Cancel button.
_RUNNING: dict[str, Any] = {}
_RUNNING_LOCK = threading.Lock()


def speed_methods(preset: ModelPreset) -> list[str]:
    """The methods a tune searches on ``preset`` by default (those that buy speed and it takes)."""
    from vdtome.methods.tuning import search_space

    return [part.method.name for part in search_space(preset).methods]


def default_floors(preset: ModelPreset) -> str:
    from vdtome.bench.tune_plan import judged

    return "judge, psnr=20" if judged(preset) else "psnr=24"


def tuned_recipes(folder: Path) -> list[tuple[str, str]]:
    """(label, path or shipped name) of the recipes this server can load into the form: the shipped
    ones, then the tunes finished here, newest first."""
    from vdtome.methods.recipe import shipped_recipes

    found = [(f"{name} (shipped)", name) for name in shipped_recipes()]
    made = sorted(folder.glob("tune-*/recipe.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return found + [(f"{path.parent.name} (tuned here)", str(path)) for path in made]


def shipped_recipe_note(preset: ModelPreset) -> str:
    """The recipes shipped for ``preset``, each with what its validation measured, and how their
    comparisons are timed ("" where none is shipped)."""
    from vdtome.methods.recipe import load_recipe, shipped_recipes

    recipes = [recipe for recipe in map(load_recipe, shipped_recipes()) if recipe.preset == preset.name]
    if not recipes:
        return ""
    lines = [f"- **{recipe.name}**: {recipe.stack_text()}; {recipe.figures_text()}." for recipe in recipes]
    text = ("Tuned for this preset (pick one above to load it; figures from the tune's own validation, the README's "
            "results have them on 20 further prompts):\n" + "\n".join(lines))
    whole = [recipe.name for recipe in recipes if not recipe.steps_alike()]
    if whole and preset.timing_steps:
        text += (f"\n\nTheir steps differ in cost (skipped steps, whole first steps), so every timing round of "
                 f"{' and '.join(whole)} runs all {preset.num_inference_steps} steps where a stack of alike steps "
                 f"times {preset.timing_steps}-step rounds after the first: a comparison takes longer.")
    return text


def _status(event) -> str:
    left = "" if event.minutes_left is None else f" · {event.minutes_left:.1f} min of search left"
    return f"**{event.trials} trials run{left} · feasible front: {event.front}.** {event.message}"


def _outcome_status(outcome) -> str:
    lines = [f"**{outcome.message}**", outcome.search_text() + "."]
    if outcome.chosen is not None:
        lines.append("Validated with the full timing protocol on prompts the study never saw (the report has each "
                     "prompt's interval). **Load into the form** sets the comparison form to this recipe.")
    return "\n\n".join(lines)


def build_tune_tab(ctx: TuneTabContext, preset: ModelPreset) -> TuneTab:
    """The tab's components and their events (call inside ``gr.Blocks`` and a ``gr.Tab``)."""
    from vdtome.web.ui import preset_choice_label

    gr.Markdown("Finds the fastest stack whose quality stays above your floors: an Optuna study over every method's "
                "own settings on two tuning prompts (one timing round per trial), then the best finalists re-run with "
                "the full timing protocol on two prompts the study never saw. The same, longer and resumable: "
                "`python -m vdtome tune` (README).")
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=320):
            tune_preset = gr.Dropdown([(preset_choice_label(p, ctx.has_gpu), p.name) for p in ctx.presets.values()],
                                      value=preset.name, label="Model preset", elem_id="tune_preset")
            tune_floors = gr.Textbox(default_floors(preset), label="Quality floors", max_lines=1, elem_id="tune_floors",
                                     info="comma-separated: psnr=DB, ssim=X, judge (shapes models: no clip whose "
                                          "colour and direction the baseline keeps is lost)")
            methods = speed_methods(preset)
            tune_methods = gr.CheckboxGroup(methods, value=methods, label="Methods to search", elem_id="tune_methods")
            tune_require = gr.Dropdown([("none", ""), *((m, m) for m in methods)], value="",
                                       label="Every stack holds", elem_id="tune_require")
            tune_minutes = gr.Number(min(5, ctx.gates.limits.tune_minutes), label="Minutes of search",
                                     info=f"at most {ctx.gates.limits.tune_minutes} on this server; the validation "
                                          "comes after", elem_id="tune_minutes")
        with gr.Column(scale=7, min_width=320):
            with gr.Row():
                tune_button = gr.Button("Tune", variant="primary", elem_id="tune-run", scale=3)
                tune_stop = gr.Button("Cancel", variant="stop", elem_id="tune-cancel", scale=1)
            tune_status = gr.Markdown(elem_id="tune-status")
            tune_plot = gr.Image(label="Trials and the Pareto front", type="filepath", interactive=False,
                                 elem_id="tune-plot")
            tune_files = gr.File(label="Recipe (JSON), report (HTML), every trial (CSV)", file_count="multiple",
                                 elem_id="tune-files")
            tune_load = gr.Button("Load into the form", visible=False, elem_id="tune-load")
            tune_recipe = gr.State(None)
    private = dict(api_visibility="private")
    inputs = [tune_preset, tune_floors, tune_methods, tune_minutes, tune_require]

    async def tune(tune_preset, tune_floors, tune_methods, tune_minutes, tune_require, request: gr.Request,
                   progress=gr.Progress()):
        """Tune a stack on the preset above the floors (comma-separated: psnr=DB, ssim=X, judge) for the
        minutes given, searching the methods listed (one may be required in every stack): streams the
        trials as they finish, then the validated recipe, its report and every trial."""
        async for update in run_tune(ctx, tune_preset, tune_floors, tune_methods, tune_minutes, tune_require,
                                     request, progress):
            yield update

    tune_button.click(tune, inputs, [tune_status, tune_plot, tune_files, tune_load, tune_recipe],
                      api_name="tune", concurrency_id=ctx.queue_id, concurrency_limit=1, preprocess=False,
                      show_progress_on=[tune_status])
    tune_stop.click(cancel_tune, None, tune_status, queue=False, **private)
    tune_preset.input(functools.partial(on_tune_preset, ctx), tune_preset,
                      [tune_methods, tune_require, tune_floors], **private)
    return TuneTab(tune_load, tune_recipe)


def on_tune_preset(ctx: TuneTabContext, name: str):
    preset = ctx.presets.get(name)
    if preset is None:
        return gr.update(), gr.update(), gr.update()
    methods = speed_methods(preset)
    return (gr.CheckboxGroup(choices=methods, value=methods),
            gr.Dropdown(choices=[("none", ""), *((m, m) for m in methods)], value=""), default_floors(preset))


def cancel_tune(request: gr.Request) -> str:
    with _RUNNING_LOCK:
        flag = _RUNNING.get(getattr(request, "session_hash", None) or "")
    if flag is None:
        return "No tune of this page is running."
    flag.set()
    return "**Cancel pressed:** the tune stops at its next denoising step and keeps its finished trials."


async def run_tune(ctx: TuneTabContext, tune_preset, tune_floors, tune_methods, tune_minutes, tune_require,
                   request: Any = None, progress: Callable[..., Any] = lambda *args, **kwargs: None):
    """The tune handler's work (see ``tune`` in :func:`build_tune_tab`): yields (status, plot,
    files, the load button, the recipe's path)."""
    from vdtome.bench.tune import Tuner
    from vdtome.bench.tune_report import pareto_png
    from vdtome.bench.tune_worker import ValidationFailed

    values = dict(zip(TUNE_FIELDS, (tune_preset, tune_floors, tune_methods, tune_minutes, tune_require)))
    try:
        plan = ctx.gates.tune(values)
    except RequestError as error:
        raise gr.Error(str(error), title="Invalid input") from None
    ctx.folder.mkdir(parents=True, exist_ok=True)
    prune(ctx.folder, KEEP_TUNES - 1, 2**30)
    folder = Path(tempfile.mkdtemp(prefix="tune-", dir=ctx.folder))
    flag = ctx.flags.new()
    session = getattr(request, "session_hash", None) or ""
    with _RUNNING_LOCK:
        _RUNNING[session] = flag
    events: queue.Queue = queue.Queue()
    context = contextvars.copy_context()
    work = Tuner(plan, folder, engine=ctx.engine(), progress=events.put, cancel=flag).run
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(context.run, work))
    records = []
    hidden = gr.Button(visible=False)
    try:
        while not future.done():
            await asyncio.wait({future}, timeout=POLL_S)
            latest, grew = None, False
            while not events.empty():
                latest = events.get_nowait()
                if latest.finished is not None:
                    records.append(latest.finished)
                    grew = True
            if latest is None:
                continue
            # The search's share of its minutes, then the validation (after the minutes), in words.
            searched = 1.0 if latest.minutes_left is None else 1 - latest.minutes_left / plan.minutes
            progress(min(searched, 0.99), desc=latest.message[:100])
            plot = gr.update()
            if grew:
                path = folder / f"progress-{len(records)}.png"
                path.write_bytes(pareto_png(records, plan.floors))
                plot = str(path)
            yield _status(latest), plot, gr.update(), hidden, None
        outcome = future.result()
    except ValidationFailed as error:  # a finalist's comparison could not run: said, the app keeps serving
        raise gr.Error(f"The tune stopped: {error}", title="Validation failed") from None
    except asyncio.CancelledError:  # the client left, or the event was cancelled: stop the worker, keep its trials
        flag.set()
        await wait_out(future)
        raise
    finally:
        flag.clear()
        with _RUNNING_LOCK:
            if _RUNNING.get(session) is flag:
                del _RUNNING[session]
    files = [outcome.files[name] for name in ("recipe", "report", "trials") if name in outcome.files]
    recipe = outcome.files.get("recipe")
    yield _outcome_status(outcome), outcome.files["plot"], files, gr.Button(visible=recipe is not None), recipe
