"""Cancel: the Cancel button's handler stops a running comparison at the next denoising step."""

import gradio as gr
import pytest

import app
from vdtome.tome.hooks import is_registered


class FakeRequest:
    session_hash = "cancel-test"


def test_cancel_stops_the_run_and_the_next_run_succeeds():
    request = FakeRequest()
    stages = []

    def progress(value, desc=None):
        stages.append(desc)
        if desc and desc.startswith("accelerated: step 1/"):
            app.cancel(request)  # what the Cancel button does, mid-run

    requests = app._requests("tiny-wan", "a lantern swinging in the wind", "", 5, 9, 64, 64, 4, 5.0,
                             0.5, 1, 2, 2, "bipartite", "all blocks", ["self-attention"], 1, "shared", True, True)
    with pytest.raises(gr.Error, match="cancelled"):
        app._execute(requests, "", request, progress)
    assert "accelerated: step 2/4" not in stages  # stopped after the step that was running
    pipe = app.engine().pipelines.get(app.PRESETS["tiny-wan"])
    assert not is_registered(pipe.transformer)  # the acceleration was removed

    stages.clear()
    views = app._execute(requests, "", request, lambda value, desc=None: stages.append(desc))
    assert views[0].error is None and "accelerated: step 4/4" in stages
