"""The command line agrees with the app: an invalid size is refused with the engine's own message
before anything loads (``--snap`` moves it, saying so), ``methods`` shows a preset's own defaults,
and listing the methods or asking for help imports neither diffusers nor transformers."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vdtome import cli
from vdtome.core.presets import get_preset
from vdtome.core.validation import RequestError
from vdtome.engine.request import ComparisonRequest, resolve

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
WAN_16_FRAMES = ["compare", "--preset", "tiny-wan", "--frames", "16", "--prompt", "x"]


def engine_message(**sizes) -> str:
    """What the engine (and so the app's gate, which calls it with snapping off) says of these sizes."""
    with pytest.raises(RequestError) as refused:
        resolve(ComparisonRequest(preset="tiny-wan", prompt="x", snap=False, **sizes), get_preset("tiny-wan"))
    return str(refused.value)


def test_an_invalid_size_is_refused_with_the_engines_message(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_run_comparison", lambda args, request: pytest.fail("the comparison ran"))
    assert cli.main(WAN_16_FRAMES) == 2
    err = capsys.readouterr().err.splitlines()
    assert engine_message(frames=16) == "tiny-wan: frames must be 4k+1 (got 16; nearest valid 17)"
    assert err == [f"error: {engine_message(frames=16)}", "(--snap runs it at the nearest valid size)"]
    assert cli.main([*WAN_16_FRAMES, "--no-snap"]) == 2  # the old flag: the default now
    assert capsys.readouterr().err.splitlines()[0] == f"error: {engine_message(frames=16)}"


def test_a_size_no_value_of_which_is_valid_gets_no_snap_hint(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_run_comparison", lambda args, request: pytest.fail("the comparison ran"))
    assert cli.main(["compare", "--preset", "tiny-wan", "--frames", "0", "--prompt", "x"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: frames must be between 1 and 10000, got 0"]


def test_snap_runs_the_nearest_valid_size_and_says_so(capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(cli, "_run_comparison", lambda args, request: ran.append(request) or 0)
    assert cli.main([*WAN_16_FRAMES, "--height", "70", "--snap"]) == 0
    settings, notes = resolve(ran[0], get_preset("tiny-wan"))
    assert (settings.frames, settings.height) == (17, 64) and ran[0].snap
    said = capsys.readouterr().err.splitlines()
    assert said == [f"--snap: {note}" for note in notes] and len(said) == 2
    assert said[0].startswith("--snap: snapped frames 16 -> 17 (frames must be 4k+1")
    assert said[1].startswith("--snap: snapped height 70 -> 64 (")


def test_snap_and_no_snap_cannot_be_given_together(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main([*WAN_16_FRAMES, "--snap", "--no-snap"])
    assert stopped.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_python_m_vdtome_refuses_an_invalid_size_before_loading_anything():
    done = subprocess.run([sys.executable, "-m", "vdtome", *WAN_16_FRAMES], capture_output=True, text=True,
                          cwd=ROOT, env=ENV, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines()[0] == f"error: {engine_message(frames=16)}"


IMPORTS_AFTER = """
import sys
from vdtome import cli

try:
    code = cli.main(sys.argv[1:])
except SystemExit as stop:  # --help
    code = stop.code
heavy = sorted(name for name in ("diffusers", "transformers") if name in sys.modules)
print("imported:", ",".join(heavy) or "none", file=sys.stderr)
raise SystemExit(code)
"""


LIGHT_COMMANDS = (["methods"], ["methods", "--preset", "tiny-shapes-128"], ["--help"], ["compare", "--help"],
                  WAN_16_FRAMES)


def test_listing_help_and_refusals_import_neither_diffusers_nor_transformers():
    """Each command in a fresh interpreter (two at a time: each is a cold import)."""
    def imported(argv: list[str]) -> tuple[list[str], subprocess.CompletedProcess]:
        return argv, subprocess.run([sys.executable, "-c", textwrap.dedent(IMPORTS_AFTER), *argv], capture_output=True,
                                    text=True, cwd=ROOT, env=ENV, timeout=120)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for argv, done in pool.map(imported, LIGHT_COMMANDS):
            assert done.returncode in (0, 2), (argv, done.stderr[-2000:])
            assert done.stderr.splitlines()[-1] == "imported: none", argv


def test_methods_shows_a_presets_own_defaults(capsys):
    assert get_preset("tiny-shapes-128").method_defaults["tome"]["ratio"] == 0.3
    assert cli.main(["methods", "--preset", "tiny-shapes-128"]) == 0
    shown = capsys.readouterr().out
    assert "Defaults below are preset tiny-shapes-128's" in shown
    assert "  ratio = 0.3  (0..0.95, sweepable) Merge ratio [preset tiny-shapes-128; method default 0.5]" in shown
    assert "  stride_y = 2  (1..9) Stride y\n" in shown  # a field the preset leaves alone: no mark
    assert all(len(line) <= cli.WIDTH for line in shown.splitlines())


def test_plain_methods_says_its_defaults_are_the_methods_own(capsys):
    assert cli.main(["methods"]) == 0
    shown = capsys.readouterr().out
    intro = " ".join(shown.split("\n\n")[0].split())
    assert intro.startswith("Defaults below are the methods' own. A preset may override them")
    assert "`python -m vdtome methods --preset NAME`" in intro
    assert "  ratio = 0.5  (0..0.95, sweepable) Merge ratio\n" in shown and "[preset" not in shown
    assert all(len(line) <= cli.WIDTH for line in shown.splitlines())


def test_methods_refuses_an_unknown_preset(capsys):
    assert cli.main(["methods", "--preset", "no-such-preset"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown model preset 'no-such-preset'; available: ")


FALLBACK_MESSAGE = "requires torchvision (not installed); falling back to"
IMPORT_DIFFUSERS = "import diffusers; diffusers.AnimateDiffPipeline"  # imports CLIP and Siglip image processors


@pytest.mark.slow
def test_the_torchvision_fallback_message_is_silenced_and_nothing_else():
    """Without torchvision, transformers announces its PIL image processors when diffusers imports
    them; vdtome drops exactly that message, so a control run without vdtome must still show it."""
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: transformers has no fallback to announce")
    # Both at once (two cores): each is a cold import of diffusers' pipelines.
    started = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT, env=ENV)
               for code in (IMPORT_DIFFUSERS, "import vdtome; " + IMPORT_DIFFUSERS)]
    outputs = [process.communicate(timeout=300) for process in started]
    plain, quiet = (subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(started, outputs))
    assert plain.returncode == quiet.returncode == 0, quiet.stderr[-2000:]
    assert plain.stderr.count(FALLBACK_MESSAGE) == 2  # CLIPImageProcessor and SiglipImageProcessor
    assert quiet.stderr.splitlines() == [line for line in plain.stderr.splitlines() if FALLBACK_MESSAGE not in line]
