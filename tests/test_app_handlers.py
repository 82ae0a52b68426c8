"""The app's event handlers in process: cancel mid-run, allocation failures mid-run, then a good run."""

import gradio as gr
import pytest
import torch

import app
from vdtome.tome.hooks import is_registered

# The form as the page sends it: preset, prompt, negative, seed, frames, height, width, steps,
# guidance, timing rounds, ratio, stride t/y/x, strategy, blocks, targets, reuse, matching,
# random destinations, window.
FORM = ("tiny-wan", "a lantern swinging in the wind", "", 5, 9, 64, 64, 4, 5.0, 7,
        0.5, 1, 2, 2, "bipartite", "all blocks", ["self-attention"], 1, "shared", True, True)


class FakeRequest:
    session_hash = "handler-test"


def tiny_wan_pipe():
    return app.engine().pipelines.get(app.PRESETS["tiny-wan"])


def test_cancel_stops_the_run_and_the_next_run_succeeds():
    request = FakeRequest()
    stages = []

    def progress(value, desc=None):
        stages.append(desc)
        if desc and desc.startswith("round 1/7 · accelerated · step 1/"):
            app.cancel(request)  # what the Cancel button does, mid-run

    requests = app._requests(*FORM)
    with pytest.raises(gr.Error, match="cancelled"):
        app._execute(requests, "", request, progress)
    assert stages[-1] == "round 1/7 · accelerated · step 1/4"  # stopped at the next step
    assert not is_registered(tiny_wan_pipe().transformer)  # the acceleration was removed

    stages.clear()
    views = app._execute(requests, "", request, lambda value, desc=None: stages.append(desc))
    assert views[0].error is None and "round 7/7 · accelerated · step 4/4" in stages


@pytest.mark.parametrize("failure", [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB"),
    lambda: RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
])
def test_allocation_failure_is_shown_not_fatal_and_not_recorded(failure):
    pipe = tiny_wan_pipe()

    def exhaust(module, args):
        if is_registered(module):  # only during the accelerated calls
            raise failure()

    hook = pipe.transformer.register_forward_pre_hook(exhaust)
    try:
        outputs = app.compare(*FORM, "", [], FakeRequest(), lambda *a, **k: None)
    finally:
        hook.remove()
    side_by_side, baseline, accelerated, _, _, _, _, notes, history, _, _ = outputs
    assert "**Error:** " in notes and "during the accelerated warm-up at 9 frames, 64x64" in notes
    assert baseline is not None and accelerated is None and side_by_side is None
    assert history == []  # a failed comparison is not a point on the chart
    assert not is_registered(pipe.transformer)

    outputs = app.compare(*FORM, "", history, FakeRequest(), lambda *a, **k: None)
    assert outputs[2] is not None and len(outputs[8]) == 1


def test_negative_prompt_box_follows_the_preset():
    box = app.on_preset("hunyuanvideo", "blurry")[1]
    assert box.interactive is False and box.value == "" and "guidance-distilled" in box.info
    box = app.on_preset("tiny-wan", "blurry")[1]
    assert box.interactive is True and box.value == "blurry"
    assert app.on_preset("cogvideox-2b", "")[-1].value == 1 and app.on_preset("tiny-ltx", "")[-1].value == 7
