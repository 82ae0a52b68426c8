"""The comparison engine on the built-in tiny presets: figures, files, caches and failures."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import vdtome
from vdtome import cli
from vdtome.core.presets import get_preset
from vdtome.engine.engine import Cancelled, ComparisonEngine
from vdtome.engine.fidelity import PSNR_CAP_DB
from vdtome.engine.outputs import download_stem
from vdtome.engine.pipelines import ModelUnavailableError, from_pretrained
from vdtome.engine.report import format_table, metric_rows
from vdtome.engine.request import ComparisonRequest, RequestError, resolve
from vdtome.engine.video_io import display_factor, probe
from vdtome.offline import tiny
from vdtome.tome import ToMeConfig
from vdtome.tome.hooks import is_registered

pytestmark = pytest.mark.slow  # whole pipelines and comparisons, run end to end

PROMPT = "a paper boat drifts down a rain-filled gutter"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ComparisonEngine(device="cpu", output_root=tmp_path_factory.mktemp("outputs"), keep_outputs=4)


def request(preset="tiny-wan", **overrides) -> ComparisonRequest:
    return ComparisonRequest(preset=preset, prompt=overrides.pop("prompt", PROMPT), **overrides)


def flat(text: str) -> str:
    """Words separated by single spaces: what wrapping at spaces leaves unchanged."""
    return " ".join(text.split())


def assert_table_fits_and_shows_every_figure(result, text: str) -> None:
    """``text``, the CLI's table of ``result``: every line within the CLI's width but a file's line
    (a path is never broken), and every cell of every metric row shown, each under its column's name."""
    files = {f"{name}: {path}" for name, path in result.files.items()}
    assert [line for line in text.splitlines() if len(line) > cli.WIDTH and line not in files] == []
    shown = flat(text)
    for metric, baseline, accelerated, change, better in metric_rows(result):
        assert flat(metric) in shown
        for column, cell in (("baseline", baseline), ("accelerated", accelerated), ("change", change),
                             ("better", better)):
            assert not cell or flat(f"{column}: {cell}") in shown, (metric, column, cell)


@pytest.mark.parametrize("preset", ["tiny-wan", "tiny-cogvideox", "tiny-ltx"])
def test_tiny_presets_run_end_to_end_with_every_figure(engine, preset, tmp_path):
    events = []
    result = engine.run(request(preset, methods=ToMeConfig(ratio=0.5), rounds=3), out_dir=tmp_path,
                        progress=events.append)
    assert result.ok, result.error
    s = result.settings
    stem = download_stem(result)
    assert stem == f"{preset}_tome-ratio-0.5-stride-1x2x2_seed0" or stem.startswith(f"{preset}_tome-ratio-0.5"), stem
    data = json.loads((tmp_path / f"{stem}_result.json").read_text())
    assert data["ok"]
    calls = data["timing"]["calls"]
    assert [(c["round"], c["side"], c["decoded"]) for c in calls] == [
        (1, "baseline", True), (1, "accelerated", True),
        (2, "accelerated", False), (2, "baseline", False),
        (3, "baseline", False), (3, "accelerated", False),
    ]
    for call in calls:
        phases = call["latency"]["phases_ms"]
        for phase in ("end_to_end", "text_encoding", "denoising"):
            assert phases[phase] > 0, (call, phase)
        assert (phases.get("vae_decode", 0) > 0) == call["decoded"]  # latent-only rounds never decode
        parts = sum(phases.get(p, 0) for p in ("text_encoding", "denoising", "vae_decode"))
        assert parts <= phases["end_to_end"]
        assert len(call["latency"]["steps_ms"]) == s.steps and all(t > 0 for t in call["latency"]["steps_ms"])
        memory = call["memory"]
        assert memory["peak_bytes"] is not None and memory["cuda_peak_allocated_bytes"] is None
    for run in ("baseline", "accelerated"):
        assert len(data[run]["temporal"]["frame_diff"]) == len(data[run]["temporal"]["warp_error"]) == s.frames - 1
    timing = data["timing"]
    # Fewer than 6 rounds: 3 pairs of calls, no interval, no verdict (the steps of a call are no repeats).
    assert timing["rounds"] == 3 and timing["denoising"]["ratio"]["pairs"] == 3
    assert timing["denoising"]["ratio"]["unit"] == "rounds" and timing["denoising"]["ratio"]["verdict"] == "not tested"
    assert timing["denoising"]["ratio"]["low"] is None and timing["end_to_end"]["ratio"]["value"] > 0
    assert [phase["phase"] for phase in timing["untouched"]] == ["text_encoding", "vae_decode"]
    for phase in timing["untouched"]:  # a noise check, never a speedup
        assert phase["ratio"]["verdict"] is None and "faster" not in phase["ratio"]["text"]
    assert data["schema_version"] == 3 and data["stack"] == "tome ratio 0.5 stride 1x2x2"
    assert [entry["method"] for entry in data["methods"]] == ["tome"]
    assert data["methods"][0]["config"]["ratio"] == 0.5
    evidence = data["methods"][0]["report"]["evidence"]
    assert evidence[0]["count"] > 0 and evidence[0]["count"] == pytest.approx(evidence[0]["of"] / 2, rel=0.1)
    merge = data["methods"][0]["report"]["detail"]
    assert merge["requested_ratio"] == 0.5 and merge["effective_ratio"] == pytest.approx(0.5, abs=0.05)
    assert merge["tokens_per_block"] and all(b["tokens_out"] < b["tokens_in"] for b in merge["tokens_per_block"])
    fid = data["fidelity"]
    assert len(fid["psnr"]) == len(fid["ssim"]) == len(fid["mse"]) == s.frames
    assert not fid["identical"] and 0 < fid["ssim_mean"] < 1 and fid["psnr_mean"] < PSNR_CAP_DB
    env = data["environment"]
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"] == torch.__version__
    assert env["dtype"] == "float32" and env["device"] == "cpu"
    # File names carry the settings; the JSON holds names only, no server paths.
    assert data["files"] == {"baseline": f"{stem}_baseline.mp4", "accelerated": f"{stem}_accelerated.mp4",
                             "side_by_side": f"{stem}_side-by-side.mp4", "difference": f"{stem}_difference.mp4",
                             "frames": "frames", "json": f"{stem}_result.json"}
    # One progress bar over every step of the request, warm-ups included, with named stages; the
    # work after the loops (metrics, writing) is named too.
    steps = [e for e in events if e.steps]
    assert [e.done for e in steps] == list(range(1, len(steps) + 1)) and events[-1].done == events[-1].total
    labels = [e.label for e in events]
    assert "round 1/3 · baseline · decoding the video" in labels and "round 3/3 · accelerated · step 4/4" in labels
    assert any(label.startswith("warm-up · accelerated") for label in labels)
    assert labels[-2:] == ["fidelity to the baseline (PSNR, SSIM)", "writing the videos, frames and result.json"]
    assert "temporal consistency of the accelerated video (optical flow)" in labels
    factor = display_factor(s.height)
    assert factor > 1  # a tiny model's frames are enlarged for the player, nearest-neighbour
    for name in ("baseline", "accelerated", "difference"):
        info = probe(result.files[name])
        assert (info["codec"], info["pix_fmt"], info["frames"]) == ("h264", "yuv420p", s.frames)
        assert (info["height"], info["width"]) == (s.height * factor, s.width * factor) and info["faststart"]
    composite = probe(result.files["side_by_side"])
    assert composite["frames"] == s.frames and composite["width"] > 2 * s.width * factor
    frames = sorted(Path(result.files["frames"]).iterdir())
    assert len(frames) == 2 * s.frames  # lossless PNGs at the model's own size
    assert cv2.imread(str(frames[0])).shape == (s.height, s.width, 3)
    # The CLI's table of this result: blocks within 100 columns, or the wide table, one line per metric.
    assert_table_fits_and_shows_every_figure(result, format_table(result, width=cli.WIDTH))
    wide = format_table(result).split("\n\n")[1].splitlines()
    assert len(wide) == len(metric_rows(result)) + 2 and max(map(len, wide)) > cli.WIDTH  # header, rule, rows
    for line, row in zip(wide[2:], metric_rows(result)):
        assert line.startswith(row[0]) and all(cell in line for cell in row), (line, row)


def test_ratio_zero_reports_identical_videos(engine):
    result = engine.run(request(methods=ToMeConfig(ratio=0.0), reuse_baseline=False))
    assert result.ok
    assert result.fidelity.identical and result.fidelity.mse_mean == 0.0
    assert result.fidelity.psnr_mean == PSNR_CAP_DB and result.fidelity.ssim_mean == 1.0
    assert np.array_equal(result.baseline.frames, result.accelerated.frames)


def test_changing_only_the_ratio_reuses_the_baseline_video_not_its_timing(engine):
    first = engine.run(request(seed=11, methods=ToMeConfig(ratio=0.3)))
    assert not first.baseline_reused
    started = time.time()
    second = engine.run(request(seed=11, methods=ToMeConfig(ratio=0.6, stride=(1, 2, 2))))
    assert second.baseline_reused and second.baseline is first.baseline  # the same video, not made again
    baseline_calls = [c for c in second.timing.calls if c.side == "baseline"]
    # The baseline is timed again, in this request, next to the accelerated calls, but not decoded.
    assert len(baseline_calls) == second.settings.rounds and not any(c.decoded for c in baseline_calls)
    assert all(c.started_at >= started for c in second.timing.calls)
    assert "its timing was measured again" in " ".join(second.notes)
    assert second.fidelity.psnr_mean < first.fidelity.psnr_mean  # more merging drifts further
    # Anything that shapes the baseline (here the seed) makes its video again.
    third = engine.run(request(seed=12, methods=ToMeConfig(ratio=0.6)))
    assert not third.baseline_reused and any(c.decoded for c in third.timing.calls if c.side == "baseline")


def test_one_copy_of_the_weights_and_no_hook_left(engine):
    engine.run(request(methods=ToMeConfig(ratio=0.5)))
    loads = engine.pipelines.loads
    engine.run(request(methods=ToMeConfig(ratio=0.4)))
    assert engine.pipelines.loads == loads
    pipe = engine.pipelines.get(get_preset("tiny-wan"), "cpu")
    assert not is_registered(pipe.transformer)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(preset="no-such-model"), "tiny-wan"),
        (dict(prompt="   "), "prompt is empty"),
        (dict(steps=-3), "steps must be between 1"),
        (dict(guidance=float("nan")), "guidance must be a finite number"),
        (dict(seed=-1), "seed must be between 0"),
        (dict(frames=18, snap=False), "frames must be 4k+1"),
        (dict(methods="tome"), "unknown acceleration config"),
    ],
)
def test_bad_requests_fail_clearly_and_the_next_succeeds(engine, overrides, message):
    with pytest.raises((RequestError, TypeError), match=message.replace("+", r"\+")):
        engine.run(request(**overrides))
    assert engine.run(request(methods=ToMeConfig(ratio=0.5))).ok


def test_ratio_out_of_range_is_refused_when_building_the_config():
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\)"):
        ToMeConfig(ratio=1.5)
    # Above the stride's cap the config refuses, naming it, rather than running at the cap.
    with pytest.raises(ValueError, match=r"ratio must be at most 1 - 1/\(st\*sy\*sx\) = 0.75 for stride \(1, 2, 2\)"):
        ToMeConfig(ratio=0.9)
    assert ToMeConfig(ratio=0.75).max_ratio == 0.75 and ToMeConfig(ratio=0.85, stride=(1, 3, 3)).ratio == 0.85
    with pytest.raises(ValueError, match="makes every token a destination"):
        ToMeConfig(ratio=0.1, stride=(1, 1, 1))


def test_invalid_sizes_are_snapped_and_reported(engine):
    result = engine.run(request(frames=10, height=70, width=60, methods=ToMeConfig(ratio=0.5)))
    assert (result.settings.frames, result.settings.height, result.settings.width) == (9, 64, 64)
    notes = " ".join(result.notes)
    assert "frames 10 -> 9" in notes and "height 70 -> 64" in notes and "width 60 -> 64" in notes
    assert result.baseline.frames.shape[:3] == (9, 64, 64)


ALLOCATION_FAILURES = {
    "out of memory": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    "cudnn": lambda: RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    "cuda runtime": lambda: torch.AcceleratorError("CUDA error: out of memory (cudaErrorMemoryAllocation)"),
}


@pytest.mark.parametrize("kind", ALLOCATION_FAILURES)
def test_allocation_failure_in_the_accelerated_run_keeps_the_baseline_and_frees_memory(engine, kind, monkeypatch):
    pipe = engine.pipelines.get(get_preset("tiny-wan"), "cpu")
    held, releases = [], []

    def exhaust(module, args):
        if is_registered(module):  # only while the acceleration is applied
            tensor = torch.empty(256, 1024)  # a tensor of the failed run, held by the traceback's frame
            held.append(weakref.ref(tensor))
            raise ALLOCATION_FAILURES[kind]()

    def release(device=None):
        assert held and held[0]() is None, "memory released while the exception still held the failed run's tensors"
        releases.append(device)

    monkeypatch.setattr("vdtome.engine.engine.release_memory", release)
    hook = pipe.transformer.register_forward_pre_hook(exhaust)
    try:
        result = engine.run(request(seed=21, methods=ToMeConfig(ratio=0.5)))
    finally:
        hook.remove()
    assert not result.ok and result.timing is None and releases
    assert "during the accelerated warm-up at 9 frames, 64x64, 4 steps" in result.error
    assert ("out of memory" if kind != "cudnn" else "a memory allocation failed") in result.error
    assert result.baseline is not None and result.accelerated is None  # the baseline video is kept
    assert probe(result.files["baseline"])["frames"] == 9
    assert not is_registered(pipe.transformer)
    assert json.loads(open(result.files["json"]).read())["error"] == result.error
    assert engine.run(request(seed=21, methods=ToMeConfig(ratio=0.5))).ok


def test_allocation_failure_message_names_the_request_size_and_the_preset_need():
    from types import SimpleNamespace

    from vdtome.engine.engine import _allocation_message

    preset = get_preset("hunyuanvideo")
    settings, _ = resolve(request("hunyuanvideo", frames=129, height=720, width=1280), preset)
    session = SimpleNamespace(settings=settings, preset=preset, stage="the accelerated run (round 1)",
                              engine=SimpleNamespace(device=torch.device("cpu")))
    message = _allocation_message(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), session)
    assert message.startswith("a memory allocation failed during the accelerated run (round 1) at 129 frames, 720x1280")
    assert f"needs about {preset.gpu_memory_gb:g} GB of GPU memory at its defaults (61 frames, 320x512)" in message
    assert "CUDNN_STATUS_ALLOC_FAILED" in message


def test_errors_that_are_not_allocation_failures_are_not_swallowed(engine):
    pipe = engine.pipelines.get(get_preset("tiny-wan"), "cpu")

    def broken(module, args):
        if is_registered(module):
            raise RuntimeError("shape mismatch in a patched block")

    hook = pipe.transformer.register_forward_pre_hook(broken)
    try:
        with pytest.raises(RuntimeError, match="shape mismatch"):
            engine.run(request(seed=22, methods=ToMeConfig(ratio=0.5)))
    finally:
        hook.remove()
    assert not is_registered(pipe.transformer)


def test_non_finite_output_is_detected(engine):
    pipe = engine.pipelines.get(get_preset("tiny-wan"), "cpu")

    def poison(module, args, output):
        if is_registered(module):
            return (output[0] * float("nan"),) + tuple(output[1:])

    hook = pipe.transformer.register_forward_hook(poison)
    try:
        result = engine.run(request(seed=31, methods=ToMeConfig(ratio=0.5)))
    finally:
        hook.remove()
    assert not result.ok and "accelerated video has" in result.error and "NaN/inf" in result.error
    assert result.accelerated.nonfinite_values > 0 and result.fidelity is None
    assert probe(result.files["accelerated"])["frames"] == result.settings.frames
    json.loads(open(result.files["json"]).read())  # still strict JSON


def test_cancel_stops_the_run_and_removes_the_acceleration(engine):
    cancel = threading.Event()
    stopped_at = []

    def progress(event):
        stopped_at.append(event.label)
        if event.stage == "accelerated" and event.round == 1:
            cancel.set()

    with pytest.raises(Cancelled):
        engine.run(request(seed=41, methods=ToMeConfig(ratio=0.5)), progress=progress, cancel=cancel)
    assert stopped_at[-1] == "round 1/7 · accelerated · step 1/4"  # stopped at the next step
    assert not is_registered(engine.pipelines.get(get_preset("tiny-wan"), "cpu").transformer)


def test_local_save_pretrained_folder_loads_through_the_hub_code_path(tmp_path):
    saved = tiny.tiny_wan_pipeline(seed=5)
    saved.save_pretrained(tmp_path / "tiny-wan")
    preset = get_preset("tiny-wan")
    loaded = from_pretrained(preset, source=str(tmp_path / "tiny-wan"))
    assert type(loaded).__name__ == preset.pipeline_class
    for name, param in saved.transformer.state_dict().items():
        assert torch.equal(param, loaded.transformer.state_dict()[name]), name
    engine = ComparisonEngine(device="cpu", output_root=tmp_path / "out")
    result = engine.run(request(methods=ToMeConfig(ratio=0.5)), source=str(tmp_path / "tiny-wan"))
    assert result.ok and engine.pipelines.loads == 1


def test_uncached_hub_weights_give_a_clear_error():
    preset = get_preset("wan2.1-t2v-1.3b")
    with pytest.raises(ModelUnavailableError, match="Wan-AI/Wan2.1-T2V-1.3B-Diffusers") as error:
        from_pretrained(preset)
    assert "HF_HUB_OFFLINE" in str(error.value)


def test_gpu_presets_are_refused_on_cpu(tmp_path):
    engine = ComparisonEngine(device="cpu", output_root=tmp_path)
    with pytest.raises(ModelUnavailableError, match="needs a GPU"):
        engine.run(request("cogvideox-2b"))


def test_the_public_compare_takes_a_request_or_its_fields(tmp_path):
    result = vdtome.compare("tiny-wan", PROMPT, methods=(vdtome.ToMeConfig(ratio=0.5),), rounds=2, out_dir=tmp_path)
    assert isinstance(result, vdtome.ComparisonResult) and result.ok and result.stack.startswith("tome ratio 0.5")
    assert Path(result.files["json"]).parent == tmp_path and Path(result.files["json"]).exists()
    again = vdtome.compare(request(methods=ToMeConfig(ratio=0.5), rounds=2), write=False)
    assert again.baseline_reused and not again.files  # the same engine: its baseline video cache answered
    with pytest.raises(TypeError, match="not both"):
        vdtome.compare(request(), PROMPT)


def test_cli_prints_a_table_and_writes_the_files(tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "vdtome", "compare", "--preset", "tiny-wan", "--prompt", PROMPT, "--ratio", "0.5",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "end-to-end (projected: denoising + untouched phases measured here)" in done.stdout
    assert "merge ratio (requested / effective)" in done.stdout and "Timing: 7 round(s)" in done.stdout
    assert [line for line in done.stdout.splitlines() if len(line) > cli.WIDTH and str(out) not in line] == []
    for message in ("requires torchvision", "torch_dtype"):  # known-harmless messages are silenced
        assert message not in done.stderr
    stem = "tiny-wan_tome-ratio-0.5-stride-1x2x2_seed0"
    assert {p.name for p in out.iterdir()} >= {f"{stem}_{name}" for name in (
        "baseline.mp4", "accelerated.mp4", "side-by-side.mp4", "difference.mp4", "result.json")} | {"frames"}


def test_wide_prints_the_one_line_per_row_table(engine, monkeypatch, capsys):
    """``--wide``: the table as one line per metric row, however long (the default wraps at 100)."""
    import vdtome.engine.engine

    ran = []
    monkeypatch.setattr(vdtome.engine.engine, "ComparisonEngine", lambda device=None: engine)
    monkeypatch.setattr(engine, "run", lambda request, **kwargs: ran.append(ComparisonEngine.run(
        engine, request, **kwargs)) or ran[-1])
    assert cli.main(["compare", "--preset", "tiny-wan", "--prompt", PROMPT, "--ratio", "0.5", "--rounds", "2",
                     "--wide"]) == 0
    (result,) = ran
    assert capsys.readouterr().out.rstrip("\n") == format_table(result)
    rows = format_table(result).split("\n\n")[1].splitlines()[2:]
    assert [line.split(" | ")[0].rstrip() for line in rows] == [row[0] for row in metric_rows(result)]


def test_a_field_flag_and_its_method_spec_are_refused_alike(capsys):
    """``--ratio 0.9`` goes through token merging's own parser, as ``--method tome:ratio=0.9`` does."""
    refusals = []
    for given in (["--ratio", "0.9"], ["--method", "tome:ratio=0.9"], ["--ratio", "1.2"], ["--method", "tome:ratio=1.2"]):
        assert cli.main(["compare", "--preset", "tiny-wan", "--prompt", PROMPT, *given]) == 2
        refusals.append(capsys.readouterr().err.strip())
    assert refusals[0] == refusals[1] == ("error: tome: merge ratio must be between 0 and 0.75 for stride (1, 2, 2) "
                                          "(one token in every 4 is a destination and cannot merge), got 0.9")
    assert refusals[2] == refusals[3] and "ratio" in refusals[2] and "1.2" in refusals[2]


def test_the_app_and_the_library_share_one_engine(monkeypatch):
    import vdtome.engine.engine as compare

    monkeypatch.setattr(compare, "_default_engine", None)
    monkeypatch.setattr(compare, "_default_settings", {})
    first = compare.default_engine(keep_outputs=3)
    assert compare.default_engine() is first and compare.default_engine(keep_outputs=3) is first
    with pytest.raises(RuntimeError, match="already created"):
        compare.default_engine(keep_outputs=4)  # never a second engine with its own pipelines
