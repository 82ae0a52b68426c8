"""vdtome web app: the same prompt and seed through the baseline and the accelerated pipeline.

Widgets only: requests are checked and run by :mod:`vdtome.compare` (through the helpers in
:mod:`vdtome.ui`). Runs offline on the built-in tiny models; on a GPU (or a ZeroGPU Space) the
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


def _on_zero_gpu() -> bool:
    """A ZeroGPU Space, not merely the `spaces` package installed (its GPU decorator is then a no-op)."""
    if spaces is None:
        return False
    config = getattr(getattr(spaces, "config", None), "Config", None)
    if config is not None and hasattr(config, "zero_gpu"):
        return bool(config.zero_gpu)
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")


ON_ZERO_GPU = _on_zero_gpu()

# Every instance works in a private folder (outputs, Gradio's cache, cancel flags): two instances
# on one host never prune or serve each other's files. Set before Gradio reads GRADIO_TEMP_DIR.
from vdtome.storage import instance_folder, prune

INSTANCE_DIR = instance_folder(os.environ.get("GRADIO_TEMP_DIR") or None, prefix="vdtome-app-")
GRADIO_CACHE = INSTANCE_DIR / "gradio"
os.environ["GRADIO_TEMP_DIR"] = str(GRADIO_CACHE)

import dataclasses
import inspect
import signal

import gradio as gr
import pandas as pd
import torch
from starlette.middleware import Middleware

from vdtome.cancel import CancelFlag, CancelFlags
from vdtome.compare import (
    MAX_ROUNDS,
    Cancelled,
    ComparisonEngine,
    ComparisonRequest,
    ProgressEvent,
    default_engine,
    resolve,
)
from vdtome.denoisers import pipeline_denoiser_types
from vdtome.limits import ServiceLimits
from vdtome.methods import METHODS, FormField, check_available, check_stack, stack_label
from vdtome.metrics import PSNR_CAP_DB
from vdtome.pipelines import (
    ALLOW_CUSTOM_MODEL_ENV,
    CustomModelRefused,
    ModelUnavailableError,
    custom_model_source,
    custom_models_allowed,
)
from vdtome.presets import load_presets, load_prompts
from vdtome.protocol import MAX_GPU_SECONDS
from vdtome.report import COLUMNS
from vdtome.serving import ServiceGuard, StrictBlocks, limit_visitors, run_until_abandoned
from vdtome.ui import (
    CUSTOM_MODEL,
    HISTORY_COLUMNS,
    PLOT_COLUMNS,
    PLOT_SPEEDUP,
    SWEEP_FIELD,
    SWEEP_VALUES,
    ComparisonView,
    api_fields,
    appended_from,
    comparison_view,
    gpu_estimate,
    method_defaults,
    preset_choice_label,
    preset_info,
    stack_from_form,
    sweep_choices,
    sweep_suggestion,
    sweep_stacks,
)
from vdtome.validation import RequestError, shown

DEFAULT_PRESET = os.environ.get("VDTOME_DEFAULT_PRESET", "tiny-wan")
DEFAULT_PROMPT = "A red fox trots across a snowy meadow at dawn, the camera tracking sideways."
KEEP_OUTPUTS = 24  # comparison folders kept on disk (a sweep writes up to 8)
KEEP_CACHE_ENTRIES = 200  # files Gradio keeps to serve (about 5 per comparison); older ones go first
GPU_QUEUE = "gpu"  # every generation event shares one queue: two runs on one GPU would time each other

PRESETS = load_presets()
PROMPTS = load_prompts()
LIMITS = ServiceLimits.from_env(PRESETS)
# ZeroGPU attaches a GPU to each call (the app's own process has none); elsewhere ask torch.
HAS_GPU = ON_ZERO_GPU or torch.cuda.is_available()

# Files, not events: they reach the ZeroGPU worker that generates (see vdtome.cancel).
CANCEL_FLAGS = CancelFlags(INSTANCE_DIR / "cancel")

# The endpoints' parameters in the order the page and the API send them (declared by vdtome.ui).
COMPARE_FIELDS = api_fields(sweep=False)
SWEEP_FIELDS = api_fields(sweep=True)


def engine() -> ComparisonEngine:
    """The process's one engine (vdtome.compare.default_engine), with this instance's folders."""
    return default_engine(output_root=INSTANCE_DIR / "outputs", keep_outputs=KEEP_OUTPUTS,
                          keep_bytes=LIMITS.outputs_mb * 2**20)


# ---- the GPU part (one function, so ZeroGPU can wrap it) ------------------------------------------


def run_requests(requests: list[ComparisonRequest], source: str | None, cancel: CancelFlag,
                 progress=gr.Progress()) -> list[ComparisonView]:
    """Run one comparison per request on the shared engine; stops early when cancelled, and then
    deletes what the earlier points of a sweep wrote (nobody will be shown them)."""
    views: list[ComparisonView] = []
    try:
        for index, request in enumerate(requests):
            prefix = f"{stack_label(request.methods)} ({index + 1}/{len(requests)}) · " if len(requests) > 1 else ""

            def report(event: ProgressEvent, index=index, prefix=prefix) -> None:
                progress((index + event.done / max(event.total, 1)) / len(requests), desc=prefix + event.label)

            progress(index / len(requests), desc=f"{prefix}loading {request.preset}")
            result = engine().run(request, progress=report, cancel=cancel, source=source)
            views.append(comparison_view(result))
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


TINY_GPU_SECONDS = 60  # built-in tiny models run in seconds; they carry no GPU figures


def _gpu_duration(requests: list[ComparisonRequest], source: str | None, cancel: CancelFlag, progress=None) -> int:
    """Seconds to ask ZeroGPU for: loading, warm-ups, every timed round and both decodes."""
    if PRESETS[requests[0].preset].gpu_time is None:
        return TINY_GPU_SECONDS
    return gpu_estimate(requests).seconds


if ON_ZERO_GPU:
    run_requests = spaces.GPU(duration=_gpu_duration)(run_requests)


# ---- checking a request (the same code before it is queued and when it runs) ---------------------


def plan(values: dict, sweep: bool = False) -> tuple[list[ComparisonRequest], str | None]:
    """Requests (one, or one per value of the swept field for a sweep) and the custom-weights
    source from the form's values exactly as the client sent them; raises RequestError naming the
    field and the rule."""
    preset = values["preset"]
    if not isinstance(preset, str) or preset not in PRESETS:
        raise RequestError(f"model preset must be one of {', '.join(PRESETS)}, got {shown(preset)}", "preset")
    if PRESETS[preset].requires_gpu and not HAS_GPU:
        raise RequestError(f"{PRESETS[preset].label} needs a GPU and this machine has none; pick a tiny preset", "preset")
    stack = stack_from_form(values)
    check_available(check_stack(stack), pipeline_denoiser_types(PRESETS[preset].pipeline_class))
    numbers = {name: _number(values[name], name) for name in ("seed", "frames", "height", "width", "steps", "guidance",
                                                             "rounds")}
    base = ComparisonRequest(
        preset=preset, prompt=values["prompt"], negative_prompt=values["negative_prompt"], methods=stack,
        snap=False,  # the page says what is wrong instead of silently running another size
        **numbers,
    )
    settings, _ = resolve(base, PRESETS[preset])  # every model rule, before the request is queued
    requests = [base]
    if sweep:
        requests = [dataclasses.replace(base, methods=point) for point in sweep_stacks(values)]
    if ON_ZERO_GPU and PRESETS[preset].gpu_time is not None:
        estimate = gpu_estimate(requests)
        if not estimate.fits:
            parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in estimate.parts().items())
            raise RequestError(
                f"this request needs about {estimate.total_s:.0f} s of GPU time ({parts}); a ZeroGPU task may "
                f"take at most {MAX_GPU_SECONDS} s: lower the steps, frames, size, timing rounds or sweep points",
                "steps",
            )
    LIMITS.check_work(PRESETS[preset], settings, points=len(requests))
    return requests, _source(values[CUSTOM_MODEL])


def _number(value, name: str):
    """Empty boxes are refused here; every other rule is checked by the engine (never coerced)."""
    if value is None or value == "":
        raise RequestError(f"{name} is empty: enter a number", name)
    return value


def _source(custom_model) -> str | None:
    if custom_model is not None and not isinstance(custom_model, str):
        raise RequestError(f"custom weights must be text, got {shown(custom_model)}", "custom_model")
    if not (custom_model or "").strip():
        return None
    if not custom_models_allowed():
        raise RequestError(f"custom model ids are switched off; the operator can allow them with "
                           f"{ALLOW_CUSTOM_MODEL_ENV}=1", "custom_model")
    try:
        return custom_model_source(custom_model, LIMITS.custom_model_root)
    except CustomModelRefused as error:
        raise RequestError(str(error), "custom_model") from None


def validator(names: tuple[str, ...], sweep: bool):
    """Gradio's validator for an endpoint whose inputs are ``names``: runs :func:`plan` when the
    request is submitted, so a bad one is refused with the message beside its field before it
    takes a queue place."""

    def check(*values):
        fields = dict(zip(names, values))
        try:
            plan(fields, sweep)
        except RequestError as error:
            at = names.index(error.field) if error.field in names else 0
            return [gr.validate(index != at, str(error) if index == at else "") for index in range(len(names))]
        return [gr.validate(True, "") for _ in names]

    return check


# ---- event handlers ------------------------------------------------------------------------------


async def _execute(requests: list[ComparisonRequest], source: str | None, progress) -> list[ComparisonView]:
    """Run in a worker thread; a cancelled event or a departed client stops it at the next step."""
    flag = CANCEL_FLAGS.new()
    prune(GRADIO_CACHE, KEEP_CACHE_ENTRIES, LIMITS.cache_mb * 2**20)  # before this run's files arrive

    def stop(reason: str) -> None:
        print(f"vdtome: stopping a comparison: {reason}", flush=True)
        flag.set()

    try:
        return await run_until_abandoned(lambda: run_requests(requests, source, flag, progress=progress), stop,
                                         discard=_discard)
    except (RequestError, ModelUnavailableError) as error:
        raise gr.Error(str(error), title="Cannot run this comparison") from None
    except Cancelled as error:
        print(f"vdtome: {error}; nothing was written", flush=True)
        raise gr.Error("The comparison was cancelled.", title="Cancelled") from None
    finally:
        flag.clear()


def _history_outputs(history: list[dict]):
    table = pd.DataFrame([entry["row"] for entry in history], columns=list(HISTORY_COLUMNS))
    # Identical videos (ratio 0) have no finite PSNR: they are in the table, not on the chart.
    points = pd.DataFrame([entry["point"] for entry in history if entry.get("point") is not None
                           and entry["point"]["PSNR vs baseline (dB)"] < PSNR_CAP_DB], columns=list(PLOT_COLUMNS))
    return table, points


def _record(history: list[dict], views: list[ComparisonView]) -> list[dict]:
    """History with the new runs appended, the oldest dropped beyond the operator's cap."""
    history = list(history or [])
    for view in views:
        if view.entry is not None:
            run = history[-1]["row"][0] + 1 if history else 1
            entry = dataclasses.replace(view.entry, run=run)
            history.append({"row": entry.row(), "point": entry.point()})
    return history[-LIMITS.history_rows:]


def _show(view: ComparisonView):
    files = view.files
    notes = [f"- {note}" for note in view.notes]
    for warning in view.warnings:
        gr.Warning(warning)
        notes.insert(0, f"**Warning:** {warning}")
    if view.error:
        gr.Warning(view.error)
        notes.insert(0, f"**Error:** {view.error}")
    return (
        files.get("side_by_side"),
        files.get("baseline"),
        files.get("accelerated"),
        files.get("difference"),
        files.get("json"),
        pd.DataFrame(view.rows, columns=list(COLUMNS)),
        f"<small>{view.environment}</small>",
        "\n".join(notes),
    )


async def _run_form(values: dict, sweep: bool, history, progress):
    """Shared body of Run and Run sweep: form -> requests -> runs -> page outputs and history."""
    try:
        requests, source = plan(values, sweep)
    except RequestError as error:
        raise gr.Error(str(error), title="Invalid input") from None
    views = await _execute(requests, source, progress)
    history = _record(history, views)
    return (*_show(views[-1]), history, *_history_outputs(history))


def _endpoint(name: str, fields: tuple[str, ...], sweep: bool, doc: str):
    """An event handler taking the form's ``fields`` by name (then the session's history): the
    form is declared once (vdtome.ui), so a new method adds parameters without editing this file.
    Gradio reads the parameter names (the API's) from the signature and passes every value; a
    Python caller may leave out the methods' fields (their defaults apply; any other missing value
    is refused naming its field)."""
    defaults = method_defaults() | {CUSTOM_MODEL: ""}
    signature = inspect.Signature([
        *(inspect.Parameter(field, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults.get(field))
          for field in fields),
        inspect.Parameter("history", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()),
    ])

    async def handler(*arguments, **named):
        bound = signature.bind(*arguments, **named)
        bound.apply_defaults()
        values = dict(bound.arguments)
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


def cancel_requested():
    return ("**Cancelled.** A running comparison stops at its next denoising step (a model still loading "
            "finishes loading first) and saves nothing; Run is available again once it has stopped.")


def clear_history():
    return [], *_history_outputs([])


def _frames_info(rules) -> str:
    return f"{rules.frames_rule}, {rules.valid_frame_range[0]}-{rules.valid_frame_range[1]}"


def _side_info(rules) -> str:
    return f"multiple of {rules.side_multiple}, {rules.valid_side_range[0]}-{rules.valid_side_range[1]}"


def _negative_prompt_box(preset, value: str = "") -> gr.Textbox:
    if preset.negative_prompt_unsupported:
        return gr.Textbox(value="", interactive=False, info=f"Not used by this model: {preset.negative_prompt_unsupported}.")
    return gr.Textbox(value=value, interactive=True, info=None)


ROUNDS_INFO = f"1-{MAX_ROUNDS} pairs of back-to-back calls; 6+ give an interval from rounds alone"


def on_preset(name: str, negative_prompt: str):
    preset = PRESETS[name]
    rules = preset.constraints
    return (
        preset_info(preset, HAS_GPU),
        _negative_prompt_box(preset, negative_prompt),
        gr.Number(value=preset.num_frames, info=_frames_info(rules)),
        gr.Number(value=preset.height, info=_side_info(rules)),
        gr.Number(value=preset.width, info=_side_info(rules)),
        gr.Number(value=preset.num_inference_steps),
        gr.Number(value=preset.guidance_scale),
        gr.Number(value=preset.timing_rounds),
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
    reasons = _unavailable(PRESETS[name])
    return [gr.Checkbox(**_switch(method, reasons[key], value))
            for (key, method), value in zip(METHODS.items(), switches)]


def _widget(form_field: FormField):
    """The Gradio input for a method's field (elem_id = its API name)."""
    common = dict(label=form_field.label, info=form_field.help or None, elem_id=form_field.name)
    if form_field.kind in ("number", "integer"):
        return gr.Slider(form_field.minimum, form_field.maximum, value=form_field.default, step=form_field.step
                         or (1 if form_field.kind == "integer" else None), **common)
    if form_field.kind == "boolean":
        return gr.Checkbox(value=form_field.default, **common)
    if form_field.kind == "choice":
        return gr.Radio(list(form_field.options), value=form_field.default, **common)
    return gr.CheckboxGroup(list(form_field.options), value=list(form_field.default), **common)


def method_panel(preset) -> tuple[dict[str, gr.components.Component], list[gr.Checkbox]]:
    """One group per registered method: its switch, its fields, the advanced ones folded."""
    widgets: dict[str, gr.components.Component] = {}
    switches = []
    reasons = _unavailable(preset)
    for name, method in METHODS.items():
        with gr.Accordion(method.label, open=method.on_by_default, elem_id=f"method-{name}"):
            switch = gr.Checkbox(label=f"Use {method.label}", elem_id=method.enable_field,
                                 **_switch(method, reasons[name]))
            widgets[method.enable_field] = switch
            switches.append(switch)
            for form_field in method.fields:
                if not form_field.advanced:
                    widgets[form_field.name] = _widget(form_field)
            advanced = [f for f in method.fields if f.advanced]
            if advanced:
                with gr.Accordion("More options", open=False):
                    for form_field in advanced:
                        widgets[form_field.name] = _widget(form_field)
    return widgets, switches


# ---- layout --------------------------------------------------------------------------------------

CSS = """
#vdtome-title h1 { margin-bottom: 0.2em; }
#metrics-table { font-variant-numeric: tabular-nums; }
"""


def build_demo() -> gr.Blocks:
    preset = PRESETS[DEFAULT_PRESET]
    rules = preset.constraints
    with StrictBlocks(title="vdtome: training-free acceleration for video diffusion", delete_cache=(900, 3600)) as demo:
        gr.Markdown(
            "# vdtome\nTraining-free acceleration for video diffusion transformers: token merging (ToMe) and "
            "diffusers' step caches, alone or stacked. The same prompt and seed run through the baseline and the "
            "accelerated pipeline; both videos play side by side with latency, peak memory, what each method "
            "did and fidelity to the baseline. Every speedup is timed in the same request: baseline and "
            "accelerated calls back to back, repeated, with an interval; within noise is said so.",
            elem_id="vdtome-title",
        )
        history = gr.State([], time_to_live=LIMITS.session_ttl_s)
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Dropdown(
                    [(preset_choice_label(p, HAS_GPU), p.name) for p in PRESETS.values()],
                    value=preset.name, label="Model preset",
                )
                model_info = gr.Markdown(preset_info(preset, HAS_GPU))
                custom_model = gr.Textbox(
                    label="Custom weights (hub id or local folder, loaded with the preset's pipeline class)",
                    value="", visible=custom_models_allowed(), max_lines=1,
                )
                prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, lines=2, max_lines=6, elem_id="prompt")
                gr.Examples([[p] for p in PROMPTS], inputs=[prompt], label="Example prompts", examples_per_page=6)
                negative = gr.Textbox(label="Negative prompt", value="", max_lines=2,
                                      interactive=not preset.negative_prompt_unsupported)
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                    frames = gr.Number(label="Frames", value=preset.num_frames, precision=0,
                                       info=_frames_info(rules))
                    height = gr.Number(label="Height", value=preset.height, precision=0,
                                       info=_side_info(rules))
                    width = gr.Number(label="Width", value=preset.width, precision=0,
                                      info=_side_info(rules))
                with gr.Row():
                    steps = gr.Number(label="Steps", value=preset.num_inference_steps, precision=0)
                    guidance = gr.Number(label="Guidance", value=preset.guidance_scale)
                    # No precision: the engine refuses 2.5 with the rule instead of the page rounding it.
                    rounds = gr.Number(label="Timing rounds", value=preset.timing_rounds, step=1,
                                       info=ROUNDS_INFO, elem_id="rounds")
            with gr.Column(scale=1):
                gr.Markdown("### Acceleration (switch on any methods to stack them, applied in this order)")
                method_widgets, switches = method_panel(preset)
        with gr.Row():
            run = gr.Button("Run comparison", variant="primary", elem_id="run")
            stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
        gr.Markdown("### Result")
        side_by_side = gr.Video(label="baseline | accelerated (one player: play, pause and seek move both)",
                                autoplay=True, loop=True, buttons=["download"], elem_id="side-by-side", height=420)
        with gr.Row():
            baseline_video = gr.Video(label="baseline", loop=True, buttons=["download"], elem_id="baseline-video", height=240)
            accelerated_video = gr.Video(label="accelerated", loop=True, buttons=["download"], elem_id="accelerated-video", height=240)
            difference_video = gr.Video(label="|difference| x4", loop=True, buttons=["download"], elem_id="difference-video", height=240)
        metrics = gr.Dataframe(headers=list(COLUMNS), label="Metrics", interactive=False, elem_id="metrics-table",
                               column_count=len(COLUMNS))
        environment = gr.Markdown(elem_id="environment", label="environment")
        notes = gr.Markdown(elem_id="notes", label="notes")
        result_json = gr.File(label="All figures (JSON)", elem_id="result-json")
        with gr.Tab("Session history"):
            history_table = gr.Dataframe(headers=list(HISTORY_COLUMNS), label="Runs this session", interactive=False, elem_id="history-table",
                                         column_count=len(HISTORY_COLUMNS))
            history_plot = gr.ScatterPlot(
                x="PSNR vs baseline (dB)", y=PLOT_SPEEDUP, color="methods",
                tooltip=["run", "methods", PLOT_SPEEDUP, "interval", "verdict", "PSNR vs baseline (dB)"],
                label="Speedup against fidelity (runs with output identical to the baseline's are off the chart)", elem_id="history-plot",
            )
            with gr.Row():
                sweep_field = gr.Dropdown(sweep_choices(), value=sweep_choices()[0][1], label="Sweep over", scale=2,
                                          elem_id=SWEEP_FIELD)
                sweep_values = gr.Textbox(label="Sweep values", value=sweep_suggestion(sweep_choices()[0][1]),
                                          max_lines=1, scale=3,
                                          elem_id="sweep-ratios")
                sweep_button = gr.Button("Run sweep", scale=1, elem_id="sweep")
                clear_button = gr.Button("Clear history", scale=1)

        components = {"preset": model, "prompt": prompt, "negative_prompt": negative, "seed": seed, "frames": frames,
                      "height": height, "width": width, "steps": steps, "guidance": guidance, "rounds": rounds,
                      CUSTOM_MODEL: custom_model, SWEEP_VALUES: sweep_values, SWEEP_FIELD: sweep_field,
                      **method_widgets}
        shown = [side_by_side, baseline_video, accelerated_video, difference_video, result_json, metrics,
                 environment, notes, history, history_table, history_plot]
        # Values reach the handlers as the client sent them (preprocess=False): Gradio would round
        # 1.5 to 2 and read "false" as true; the validator refuses them, naming the field, before
        # the request takes a queue place.
        generation = dict(concurrency_id=GPU_QUEUE, concurrency_limit=1, preprocess=False)
        run_event = run.click(compare, [*(components[name] for name in COMPARE_FIELDS), history], shown,
                              api_name="compare", validator=validator((*COMPARE_FIELDS, "history"), sweep=False),
                              **generation)
        sweep_event = sweep_button.click(sweep, [*(components[name] for name in SWEEP_FIELDS), history], shown,
                                         api_name="sweep", validator=validator((*SWEEP_FIELDS, "history"), sweep=True),
                                         **generation)
        # Gradio cancels the events' tasks; run_until_abandoned turns that into the engine's stop.
        stop.click(cancel_requested, None, notes, cancels=[run_event, sweep_event], queue=False,
                   api_visibility="private")
        clear_button.click(clear_history, None, [history, history_table, history_plot], api_visibility="private")
        model.change(on_preset, [model, negative], [model_info, negative, frames, height, width, steps, guidance, rounds],
                     api_visibility="private")
        model.change(on_preset_methods, [model, *switches], switches, api_visibility="private")
        sweep_field.change(sweep_suggestion, sweep_field, sweep_values, api_visibility="private")
    # api_open=False: the direct routes (/gradio_api/run/compare, /run/predict) would skip the queue,
    # its limits and the validator; generation runs only through the queue.
    demo.queue(max_size=LIMITS.queue_size, default_concurrency_limit=1, api_open=False)
    limit_visitors(demo, GPU_QUEUE, LIMITS.queue_per_session, LIMITS.queue_per_address)
    return demo


demo = build_demo()

def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # Gradio closes the server; then the instance folder is removed at exit


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    demo.launch(
        css=CSS, theme=gr.themes.Soft(), footer_links=["api", "gradio"],
        max_file_size="1kb",  # the app takes no files; ServiceGuard refuses the upload route outright
        state_session_capacity=1000,  # sessions whose state is kept (oldest dropped first)
        app_kwargs={"middleware": [Middleware(ServiceGuard, api_parameters=demo.api_parameters)]},
    )
