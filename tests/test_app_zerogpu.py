"""ZeroGPU: with `spaces` importable, generation runs under `spaces.GPU` with a duration estimated
from the request, and `spaces` is imported before torch (nothing may touch CUDA earlier)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_SPACES = '''
import sys

TORCH_IMPORTED_FIRST = "torch" in sys.modules
DURATIONS = []


def GPU(fn=None, duration=60):
    def wrap(function):
        def run_on_gpu(*args, **kwargs):
            DURATIONS.append(duration(*args, **kwargs) if callable(duration) else duration)
            return function(*args, **kwargs)

        return run_on_gpu

    return wrap(fn) if fn is not None else wrap
'''

SCRIPT = '''
import json, sys
import app, spaces
from vdtome.compare import ComparisonRequest
from vdtome.tome import ToMeConfig

short = ComparisonRequest(preset="tiny-wan", prompt="a kite over a beach", steps=2, acceleration=ToMeConfig(ratio=0.5))
views = app.run_requests([short], None, "session")
long = ComparisonRequest(preset="tiny-wan", prompt="a kite", steps=40, frames=33)
app._gpu_duration([long, long, long], None, "session")
print(json.dumps({
    "torch_first": spaces.TORCH_IMPORTED_FIRST,
    "durations": spaces.DURATIONS,
    "estimate_long": app._gpu_duration([long, long, long], None, "session"),
    "files": sorted(views[0].files),
    "error": views[0].error,
}))
'''


def test_generation_runs_under_spaces_gpu_with_an_estimated_duration(tmp_path):
    (tmp_path / "spaces.py").write_text(FAKE_SPACES)
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["torch_first"] is False  # spaces came before torch
    assert len(report["durations"]) == 1 and 30 <= report["durations"][0] <= 1800
    assert report["estimate_long"] > report["durations"][0]  # more steps, frames and runs ask for more time
    assert report["error"] is None
    assert report["files"] == ["accelerated", "baseline", "difference", "json", "side_by_side"]
