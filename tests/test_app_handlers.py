"""The app's event handlers in process: cancel mid-run, out of memory mid-run, then a good run."""

import gradio as gr
import pytest
import torch

import app
from vdtome.tome.hooks import is_registered

# The form as the page sends it: preset, prompt, negative, seed, frames, height, width, steps,
# guidance, ratio, stride t/y/x, strategy, blocks, targets, reuse, matching, random dst, window.
FORM = ("tiny-wan", "a lantern swinging in the wind", "", 5, 9, 64, 64, 4, 5.0,
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
        if desc and desc.startswith("accelerated: step 1/"):
            app.cancel(request)  # what the Cancel button does, mid-run

    requests = app._requests(*FORM)
    with pytest.raises(gr.Error, match="cancelled"):
        app._execute(requests, "", request, progress)
    assert "accelerated: step 2/4" not in stages  # stopped after the step that was running
    assert not is_registered(tiny_wan_pipe().transformer)  # the acceleration was removed

    stages.clear()
    views = app._execute(requests, "", request, lambda value, desc=None: stages.append(desc))
    assert views[0].error is None and "accelerated: step 4/4" in stages


def test_out_of_memory_is_shown_not_fatal_and_not_recorded():
    pipe = tiny_wan_pipe()

    def exhaust(module, args):
        if is_registered(module):  # only during the accelerated run
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    hook = pipe.transformer.register_forward_pre_hook(exhaust)
    try:
        outputs = app.compare(*FORM, "", [], FakeRequest(), lambda *a, **k: None)
    finally:
        hook.remove()
    side_by_side, baseline, accelerated, _, _, _, _, notes, history, _, _ = outputs
    assert "**Error:** out of memory during the accelerated run" in notes
    assert baseline is not None and accelerated is None and side_by_side is None
    assert history == []  # a failed comparison is not a point on the chart
    assert not is_registered(pipe.transformer)

    outputs = app.compare(*FORM, "", history, FakeRequest(), lambda *a, **k: None)
    assert outputs[2] is not None and len(outputs[8]) == 1
