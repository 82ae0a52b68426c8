"""ZeroGPU: generation runs in a worker forked from the app (as the `spaces` package does), under
`spaces.GPU` with a duration estimated from the request; Cancel reaches that worker; `spaces`
comes before torch; and with `spaces` merely installed on a CPU host, nothing pretends to have a GPU."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the app imported in subprocesses (a fake ZeroGPU), comparisons run end to end

ROOT = Path(__file__).resolve().parents[1]

# A stand-in for the `spaces` package: like ZeroGPU it runs the decorated function in a forked
# worker process, so module state set in the app's process after the fork is not seen there.
FAKE_SPACES = '''
import multiprocessing
import os
import sys

TORCH_IMPORTED_FIRST = "torch" in sys.modules
DURATIONS = []
WORKER_PIDS = []


class config:
    class Config:
        zero_gpu = os.environ.get("FAKE_ZERO_GPU") == "1"


def GPU(fn=None, duration=60):
    def wrap(function):
        if not config.Config.zero_gpu:
            return function  # what spaces.GPU does off ZeroGPU

        def run_on_gpu(*args, **kwargs):
            DURATIONS.append(duration(*args, **kwargs) if callable(duration) else duration)
            context = multiprocessing.get_context("fork")
            results = context.Queue()

            def worker():
                try:
                    results.put(("ok", function(*args, **kwargs)))
                except BaseException as error:
                    results.put(("error", error))

            process = context.Process(target=worker, daemon=True)
            process.start()
            WORKER_PIDS.append(process.pid)
            kind, value = results.get()
            process.join()
            if kind == "error":
                raise value
            return value

        return run_on_gpu

    return wrap(fn) if fn is not None else wrap
'''

ZERO_GPU_SCRIPT = '''
import json, os, threading, time
import app, spaces
from vdtome.core.validation import RequestError
from vdtome.engine.engine import Cancelled
from vdtome.engine.request import ComparisonRequest
from vdtome.tome import ToMeConfig


report = {"torch_first": spaces.TORCH_IMPORTED_FIRST, "has_gpu": app.HAS_GPU}
short = ComparisonRequest(preset="tiny-wan", prompt="a kite over a beach", steps=2, rounds=1,
                          methods=ToMeConfig(ratio=0.5))
views = app.run_requests([short], None, app.CANCEL_FLAGS.new())
report.update(files=sorted(views[0].files), error=views[0].error, durations=list(spaces.DURATIONS),
              worker=spaces.WORKER_PIDS[-1] != os.getpid())

# Cancel from the app's process while the forked worker generates a long comparison.
long = ComparisonRequest(preset="tiny-wan", prompt="a kite", steps=300, methods=ToMeConfig(ratio=0.5))
outcome = {}
flag = app.CANCEL_FLAGS.new()  # what a cancelled event or a departed client sets


def generate():
    started = time.monotonic()
    try:
        app.run_requests([long], None, flag)
        outcome["result"] = "finished"
    except Cancelled:
        outcome["result"] = "cancelled"
    outcome["seconds"] = time.monotonic() - started


thread = threading.Thread(target=generate)
thread.start()
time.sleep(6)
cancelled_at = time.monotonic()
flag.set()
thread.join(timeout=120)
outcome["after_cancel"] = time.monotonic() - cancelled_at
report["cancel"] = outcome

try:
    app.plan(dict(zip(app.COMPARE_FIELDS, ("hunyuanvideo", "a kite", "", 0, 129, 720, 1280, 500, 6.0, 5, 0.5, 1, 2, 2,
                                        "bipartite", "all blocks", ["self-attention"], 1, "shared", True, True, ""))))
    report["too_long"] = None
except RequestError as error:
    report["too_long"] = str(error)
print(json.dumps(report))
'''

CPU_HOST_SCRIPT = '''
import json
import app, spaces
from vdtome.engine.request import ComparisonRequest
from vdtome.tome import ToMeConfig
from vdtome.web.ui import preset_choice_label

views = app.run_requests([ComparisonRequest(preset="tiny-wan", prompt="a kite", steps=2, rounds=1, methods=ToMeConfig())],
                         None, app.CANCEL_FLAGS.new())
print(json.dumps({
    "on_zero_gpu": app.ON_ZERO_GPU, "has_gpu": app.HAS_GPU, "durations": spaces.DURATIONS, "error": views[0].error,
    "label": preset_choice_label(app.PRESETS["cogvideox-2b"], app.HAS_GPU),
}))
'''


def run_script(tmp_path, script, zero_gpu):
    (tmp_path / "spaces.py").write_text(FAKE_SPACES)
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}
    if zero_gpu:
        env["FAKE_ZERO_GPU"] = "1"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_generation_runs_in_a_forked_worker_with_a_duration_and_cancel_reaches_it(tmp_path):
    report = run_script(tmp_path, ZERO_GPU_SCRIPT, zero_gpu=True)
    assert report["torch_first"] is False  # spaces came before torch
    assert report["has_gpu"] is True  # ZeroGPU attaches a GPU to each call
    assert report["worker"] and report["error"] is None
    assert report["files"] == ["accelerated", "baseline", "difference", "frames", "json", "side_by_side"]
    assert report["durations"] == [60]  # a tiny preset asks for a minute
    # The flag set in the app's process stopped the worker at its next step.
    assert report["cancel"]["result"] == "cancelled", report["cancel"]
    assert report["cancel"]["after_cancel"] < 10
    assert "needs about" in report["too_long"] and "a ZeroGPU task may take at most 1800 s" in report["too_long"]


def test_spaces_installed_on_a_cpu_host_offers_no_gpu(tmp_path):
    report = run_script(tmp_path, CPU_HOST_SCRIPT, zero_gpu=False)
    assert report["on_zero_gpu"] is False and report["has_gpu"] is False
    assert report["durations"] == [] and report["error"] is None  # not wrapped: runs in process
    assert "unavailable" in report["label"]
