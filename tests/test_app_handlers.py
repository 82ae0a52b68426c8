"""The app's event handlers in process: cancel mid-run, allocation failures mid-run, then a good run."""

import asyncio
import time
from pathlib import Path

import gradio as gr
import pytest
import torch

import app
from vdtome.core.presets import load_prompts
from vdtome.tome.hooks import is_registered
from vdtome.web import history as history_runs

# The form as the page sends it: preset, prompt, negative, seed, frames, height, width, steps,
# guidance, timing rounds, ratio, stride t/y/x, strategy, blocks, targets, reuse, matching,
# random destinations, window.
FORM = ("tiny-wan", "a lantern swinging in the wind", "", 5, 9, 64, 64, 4, 5.0, 7,
        0.5, 1, 2, 2, "bipartite", "all blocks", ["self-attention"], 1, "shared", True, True)


def tiny_wan_pipe():
    return app.engine().pipelines.get(app.PRESETS["tiny-wan"])


def output_folders() -> set:
    root = app.engine().output_root
    return set(root.iterdir()) if root.exists() else set()


@pytest.mark.slow
def test_a_cancelled_event_stops_at_the_next_step_writes_nothing_and_the_next_run_succeeds():
    """Gradio cancels an event by cancelling its task (the API's /cancel, the page's Cancel): the
    worker thread must stop too, and the event must not end before it has."""
    requests, _ = app.plan(dict(zip(app.COMPARE_FIELDS, (*FORM, ""))))
    stages = []
    before = output_folders()

    async def cancel_mid_run():
        task = None

        def progress(value, desc=None):
            stages.append(desc)
            if desc and desc.startswith("round 1/7 · accelerated · step 1/"):
                loop.call_soon_threadsafe(task.cancel)
                deadline = time.monotonic() + 5  # until the event loop has turned the cancel into the flag
                while not any(app.CANCEL_FLAGS.folder.iterdir()) and time.monotonic() < deadline:
                    time.sleep(0.005)

        loop = asyncio.get_running_loop()
        task = asyncio.create_task(app._execute(requests, None, progress))
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_mid_run())
    assert stages[-1] == "round 1/7 · accelerated · step 1/4"  # stopped at the next step
    assert not is_registered(tiny_wan_pipe().transformer)  # the acceleration was removed
    assert output_folders() == before  # the abandoned run wrote nothing
    assert not any(app.CANCEL_FLAGS.folder.iterdir())  # its flag is gone: nothing piles up

    stages.clear()
    views = asyncio.run(app._execute(requests, None, lambda value, desc=None: stages.append(desc)))
    assert views[0].error is None and "round 7/7 · accelerated · step 4/4" in stages
    assert len(output_folders() - before) == 1


@pytest.mark.parametrize("failure", [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB"),
    lambda: RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
])
@pytest.mark.slow
def test_allocation_failure_is_shown_not_fatal_and_not_recorded(failure):
    pipe = tiny_wan_pipe()

    def exhaust(module, args):
        if is_registered(module):  # only during the accelerated calls
            raise failure()

    hook = pipe.transformer.register_forward_pre_hook(exhaust)
    try:
        outputs = asyncio.run(app.compare(*FORM, "", history=[], progress=lambda *a, **k: None))
    finally:
        hook.remove()
    side_by_side, baseline, accelerated, _, _, _, _, notes, history = outputs[:9]
    assert "**Error:** " in notes and "during the accelerated warm-up at 9 frames, 64x64" in notes
    assert baseline is not None and accelerated is None and side_by_side is None
    assert history == []  # a failed comparison is not a point on the chart
    assert not is_registered(pipe.transformer)

    outputs = asyncio.run(app.compare(*FORM, "", history=history, progress=lambda *a, **k: None))
    assert outputs[2] is not None and len(outputs[8]) == 1


def test_negative_prompt_box_follows_the_preset():
    box = app.on_preset("hunyuanvideo", "blurry")[2]  # after the preset's line and its details
    assert box.interactive is False and box.value == "" and "guidance-distilled" in box.info
    box = app.on_preset("tiny-wan", "blurry")[2]
    assert box.interactive is True and box.value == "blurry"
    assert app.on_preset("cogvideox-2b", "")[8].value == 7 and app.on_preset("tiny-ltx", "")[8].value == 7


def test_a_preset_this_machine_cannot_run_cannot_be_submitted_and_says_how_to_run_it(monkeypatch):
    monkeypatch.setattr(app, "HAS_GPU", False)  # as on this CPU machine, whatever runs the test
    run, sweep, notice = app.on_preset("cogvideox-2b", "")[-3:]
    assert run["interactive"] is False and sweep["interactive"] is False
    assert "no GPU" in notice and "duplicate this Space with GPU hardware" in notice
    assert "python -m vdtome compare --preset cogvideox-2b" in notice
    run, sweep, notice = app.on_preset("tiny-wan", "")[-3:]
    assert run["interactive"] is True and notice == ""


def test_the_example_prompts_follow_the_preset():
    """The trained tiny model knows only its own prompt form: its examples are those; others get the
    general set. The page opens on the trained model with its first known prompt."""
    trained = app.on_preset_prompts("tiny-shapes")
    assert [row[0] for row in trained.raw_samples] == load_prompts("shapes") and "tiny-shapes knows" in trained.label
    general = app.on_preset_prompts("tiny-wan")
    assert [row[0] for row in general.raw_samples] == load_prompts("default") and general.label == "Example prompts"
    assert app.DEFAULT_PRESET == "tiny-shapes-128"


def test_a_method_the_model_cannot_take_is_switched_off_and_locked_with_the_reason():
    on = [True] * len(app.METHODS)
    updates = app.on_preset_methods("tiny-animatediff", *on)
    by_name = dict(zip(app.METHODS, updates))
    assert by_name["tome"].interactive and by_name["tome"].value is True  # token merging serves the UNet
    cache = by_name["first_block_cache"]
    assert cache.value is False and cache.interactive is False and "no enable_cache" in cache.info
    back = dict(zip(app.METHODS, app.on_preset_methods("tiny-wan", *([False] * len(app.METHODS)))))
    assert back["first_block_cache"].interactive and back["first_block_cache"].value is False  # the user's choice


def test_the_shipped_examples_load_instantly_naming_their_hardware():
    choices = app.example_choices()
    assert len(choices) >= 3 and all(" · " in label for label, _ in choices)
    label, name = choices[0]
    outputs = dict(zip((*app.RESULT_OUTPUTS, *app.PAGE_OUTPUTS), app.show_example(name)))
    assert "Example recorded earlier" in outputs["headline"] and outputs["headline"].count('class="card tone-') == 4
    for key in ("side_by_side", "baseline_video", "accelerated_video", "difference_video", "result_json"):
        assert Path(outputs[key]).is_file() and Path(outputs[key]).is_relative_to(app.EXAMPLES_DIR)
    assert all(Path(p).is_file() for p in outputs["frame_view"])
    with pytest.raises(gr.Error, match="no example named"):
        app.show_example("../../etc")


def test_history_runs_are_shown_again_and_exported_and_a_forged_entry_is_refused():
    prompt = "a red circle moving right quickly on a black background, then a long tail of words"
    history = [{"row": [1, "tiny-wan", prompt, 0, "tome ratio 0.5 stride 1x2x2", "", "1.20x faster", "1.30x faster",
                        50.0, 0.9, "n/a", "made"],
                "point": None, "figures": {"denoising": {"speedup": 1.3, "low": 1.2, "high": 1.4, "verdict": "faster"},
                                           "end_to_end": {"speedup": 1.2, "low": 1.1, "high": 1.3, "verdict": "faster"}},
                "settings": {"prompt": prompt, "seed": "0", "tome.ratio": "0.5", "tome.stride": "(1, 2, 2)"},
                "series": None, "folder": "../../etc"}]
    with pytest.raises(gr.Error, match="the files of run 1 are gone"):
        app.show_run(1, history)
    csv = app.history_csv(history)["value"]
    with open(csv, newline="") as handle:
        rows = list(__import__("csv").DictReader(handle))
    assert rows[0]["prompt"] == prompt and rows[0]["seed"] == "0"  # the whole prompt, its own column
    assert rows[0]["denoising speedup"] == "1.3" and rows[0]["denoising low"] == "1.2"
    assert rows[0]["denoising high"] == "1.4" and rows[0]["denoising verdict"] == "faster"
    assert rows[0]["end-to-end speedup"] == "1.2" and rows[0]["tome.ratio"] == "0.5" and rows[0]["tome.stride"] == "(1, 2, 2)"
    assert history_runs.checked([{"row": "not a list"}]) == []  # a value of another shape is dropped


def _another_value(form_field, default):
    """A valid value of ``form_field`` other than ``default`` (by the field's own rule)."""
    if form_field.kind in ("integer", "number"):
        step = form_field.step or 1
        value = default + step if default + step <= form_field.maximum else default - step
        return int(value) if form_field.kind == "integer" else round(value, 6)
    if form_field.kind == "boolean":
        return not default
    if form_field.kind == "choice":
        return next(option for option in form_field.options if option != default)
    if form_field.kind == "choices":
        return list(form_field.options) if len(default) < len(form_field.options) else list(form_field.options[:1])
    return "my-schedule.json"  # text: any name


@pytest.mark.parametrize("preset", ["tiny-wan", "tiny-cogvideox", "tiny-animatediff"])
def test_a_link_round_trips_every_field_of_every_method_with_and_without_its_preset(preset):
    """The page's link (Share) of a form where one method is on and every one of its fields is off its
    default, opened again: every field and switch takes the link's value, nothing is named as a problem;
    without ``preset=`` the fields the link names still do."""
    from types import SimpleNamespace
    from urllib.parse import parse_qsl, urlencode

    from vdtome.web.ui import method_defaults, widget_value

    chosen = app.PRESETS[preset]
    base = {"preset": preset, "prompt": "a kite over a beach", "negative_prompt": "", "seed": 3,
            "frames": chosen.num_frames, "height": chosen.height, "width": chosen.width, "steps": 3,
            "guidance": chosen.guidance_scale, "rounds": 2, app.CUSTOM_MODEL: "", **method_defaults(chosen)}
    names = len(app.LINK_FIELDS)
    for method in app.METHODS.values():
        form = base | {m.enable_field: m is method for m in app.METHODS.values()}
        form |= {f.name: _another_value(f, form[f.name]) for f in method.fields}
        query = dict(parse_qsl(app.share_link(*(form[name] for name in app.COMPARE_FIELDS))[1:]))
        for params in (query, {k: v for k, v in query.items() if k != "preset"}):
            updates = app.restore_from_link(SimpleNamespace(query_params=params))
            shown = {name: update.get("value") for name, update in zip(app.LINK_FIELDS, updates)}
            switches = dict(zip(app.METHODS, updates[names:names + len(app.METHODS)]))
            notice = updates[names + len(app.METHODS) + 4]
            assert "could not" not in notice and "cannot take" not in notice, notice
            # With the preset every field is set (a multiple choice as a list: a tuple is one choice to
            # Gradio); without it, those the link names.
            for name in app.METHOD_FIELDS if "preset" in params else params:
                if name in shown:
                    assert shown[name] == widget_value(form[name]), (method.name, name, urlencode(params))
            switch = switches[method.name]
            if switch.interactive is False:  # a preset that cannot take it: locked off, saying why
                assert switch.value is False and switch.info.startswith("Unavailable for this model"), switch.info
            else:
                assert switch.value is True, (method.name, urlencode(params))
