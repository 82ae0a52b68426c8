"""The comparison engine on the built-in tiny presets: figures, files, caches and failures."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from vdtome import tiny
from vdtome.compare import (
    Cancelled,
    ComparisonEngine,
    ComparisonRequest,
    RequestError,
    run_comparison,
)
from vdtome.metrics import PSNR_CAP_DB
from vdtome.pipelines import ModelUnavailableError, from_pretrained
from vdtome.presets import get_preset
from vdtome.tome import ToMeConfig
from vdtome.tome.hooks import is_registered
from vdtome.video_io import probe

PROMPT = "a paper boat drifts down a rain-filled gutter"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ComparisonEngine(device="cpu", output_root=tmp_path_factory.mktemp("outputs"), keep_outputs=4)


def request(preset="tiny-wan", **overrides) -> ComparisonRequest:
    return ComparisonRequest(preset=preset, prompt=overrides.pop("prompt", PROMPT), **overrides)


def transformer_calls(pipe) -> list[int]:
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@pytest.mark.parametrize("preset", ["tiny-wan", "tiny-cogvideox", "tiny-ltx"])
def test_tiny_presets_run_end_to_end_with_every_figure(engine, preset, tmp_path):
    progress = []
    result = engine.run(
        request(preset, acceleration=ToMeConfig(ratio=0.5)),
        out_dir=tmp_path,
        progress=lambda stage, done, total: progress.append((stage, done, total)),
    )
    assert result.ok, result.error
    s = result.settings
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["schema_version"] == 1 and data["ok"]
    for run in ("baseline", "accelerated"):
        latency = data[run]["latency"]
        for phase in ("end_to_end", "text_encoding", "denoising", "vae_decode"):
            assert latency["phases_ms"][phase] > 0, (run, phase)
        parts = sum(latency["phases_ms"][p] for p in ("text_encoding", "denoising", "vae_decode"))
        assert parts <= latency["phases_ms"]["end_to_end"]
        assert len(latency["steps_ms"]) == s.steps and all(t > 0 for t in latency["steps_ms"])
        assert data[run]["seconds_per_step"] > 0
        memory = data[run]["memory"]
        assert memory["peak_bytes"] is not None and memory["rss_peak_bytes"] >= memory["rss_baseline_bytes"]
        assert memory["cuda_peak_allocated_bytes"] is None and memory["unavailable_reason"]
        temporal = data[run]["temporal"]
        assert len(temporal["frame_diff"]) == len(temporal["warp_error"]) == s.frames - 1
    assert data["speedup"]["end_to_end"] > 0 and data["speedup"]["denoising"] > 0
    assert isinstance(data["peak_memory_change_bytes"], int)
    merge = data["merge"]
    assert merge["requested_ratio"] == 0.5 and merge["effective_ratio"] == pytest.approx(0.5, abs=0.05)
    assert merge["tokens_per_block"] and all(b["tokens_out"] < b["tokens_in"] for b in merge["tokens_per_block"])
    fid = data["fidelity"]
    assert len(fid["psnr"]) == len(fid["ssim"]) == len(fid["mse"]) == s.frames
    assert not fid["identical"] and 0 < fid["ssim_mean"] < 1 and fid["psnr_mean"] < PSNR_CAP_DB
    env = data["environment"]
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"] == torch.__version__
    assert env["dtype"] == "float32" and env["device"] == "cpu"
    # Progress followed both runs step by step (warm-up calls are not reported).
    assert progress == [("baseline", i, s.steps) for i in range(1, s.steps + 1)] + [
        ("accelerated", i, s.steps) for i in range(1, s.steps + 1)
    ]
    for name in ("baseline", "accelerated", "difference"):
        info = probe(result.files[name])
        assert (info["codec"], info["pix_fmt"], info["frames"]) == ("h264", "yuv420p", s.frames)
        assert (info["height"], info["width"]) == (s.height, s.width) and info["faststart"]
    composite = probe(result.files["side_by_side"])
    assert composite["frames"] == s.frames and composite["width"] > 2 * s.width and composite["height"] > s.height


def test_ratio_zero_reports_identical_videos(engine):
    result = engine.run(request(acceleration=ToMeConfig(ratio=0.0), reuse_baseline=False))
    assert result.ok
    assert result.fidelity.identical and result.fidelity.mse_mean == 0.0
    assert result.fidelity.psnr_mean == PSNR_CAP_DB and result.fidelity.ssim_mean == 1.0
    assert np.array_equal(result.baseline.frames, result.accelerated.frames)


def test_changing_only_the_ratio_reuses_the_baseline(engine):
    first = engine.run(request(seed=11, acceleration=ToMeConfig(ratio=0.3)))
    assert not first.baseline_reused
    pipe = engine.pipelines.get(get_preset("tiny-wan"), "cpu")
    calls = transformer_calls(pipe)
    baseline_runs = engine.pipeline_calls["baseline"]
    second = engine.run(request(seed=11, acceleration=ToMeConfig(ratio=0.6, stride=(1, 2, 2))))
    assert second.baseline_reused and engine.pipeline_calls["baseline"] == baseline_runs
    # Only the accelerated warm-up (2 steps) and timed run (4 steps) called the transformer, CFG twice each.
    assert len(calls) == 2 * (2 + second.settings.steps)
    assert second.baseline.to_dict() == first.baseline.to_dict()
    assert "baseline reused" in " ".join(second.notes)
    assert second.fidelity.psnr_mean < first.fidelity.psnr_mean  # more merging drifts further
    # Anything that shapes the baseline (here the seed) runs it again.
    third = engine.run(request(seed=12, acceleration=ToMeConfig(ratio=0.6)))
    assert not third.baseline_reused and engine.pipeline_calls["baseline"] == baseline_runs + 1


def test_one_copy_of_the_weights_and_no_hook_left(engine):
    engine.run(request(acceleration=ToMeConfig(ratio=0.5)))
    loads = engine.pipelines.loads
    engine.run(request(acceleration=ToMeConfig(ratio=0.4)))
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
        (dict(acceleration="tome"), "unknown acceleration config"),
    ],
)
def test_bad_requests_fail_clearly_and_the_next_succeeds(engine, overrides, message):
    with pytest.raises((RequestError, TypeError), match=message.replace("+", r"\+")):
        engine.run(request(**overrides))
    assert engine.run(request(acceleration=ToMeConfig(ratio=0.5))).ok


def test_ratio_out_of_range_is_refused_when_building_the_config():
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\)"):
        ToMeConfig(ratio=1.5)


def test_invalid_sizes_are_snapped_and_reported(engine):
    result = engine.run(request(frames=10, height=70, width=60, acceleration=ToMeConfig(ratio=0.5)))
    assert (result.settings.frames, result.settings.height, result.settings.width) == (9, 64, 64)
    notes = " ".join(result.notes)
    assert "frames 10 -> 9" in notes and "height 70 -> 64" in notes and "width 60 -> 64" in notes
    assert result.baseline.frames.shape[:3] == (9, 64, 64)


def test_out_of_memory_is_reported_and_the_pipeline_stays_usable(engine):
    pipe = engine.pipelines.get(get_preset("tiny-wan"), "cpu")

    def exhaust(module, args):
        if is_registered(module):  # only while the acceleration is applied
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    hook = pipe.transformer.register_forward_pre_hook(exhaust)
    try:
        result = engine.run(request(seed=21, acceleration=ToMeConfig(ratio=0.5)))
    finally:
        hook.remove()
    assert not result.ok and "out of memory during the accelerated run" in result.error
    assert result.baseline is not None and result.accelerated is None
    assert not is_registered(pipe.transformer)
    assert json.loads(open(result.files["json"]).read())["error"] == result.error
    assert engine.run(request(seed=21, acceleration=ToMeConfig(ratio=0.5))).ok


def test_non_finite_output_is_detected(engine):
    pipe = engine.pipelines.get(get_preset("tiny-wan"), "cpu")

    def poison(module, args, output):
        if is_registered(module):
            return (output[0] * float("nan"),) + tuple(output[1:])

    hook = pipe.transformer.register_forward_hook(poison)
    try:
        result = engine.run(request(seed=31, acceleration=ToMeConfig(ratio=0.5)))
    finally:
        hook.remove()
    assert not result.ok and "accelerated video has" in result.error and "NaN/inf" in result.error
    assert result.accelerated.nonfinite_values > 0 and result.fidelity is None
    assert probe(result.files["accelerated"])["frames"] == result.settings.frames
    json.loads(open(result.files["json"]).read())  # still strict JSON


def test_cancel_stops_the_run_and_removes_the_acceleration(engine):
    cancel = threading.Event()

    def progress(stage, done, total):
        if stage == "accelerated":
            cancel.set()

    with pytest.raises(Cancelled):
        engine.run(request(seed=41, acceleration=ToMeConfig(ratio=0.5)), progress=progress, cancel=cancel)
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
    result = engine.run(request(acceleration=ToMeConfig(ratio=0.5)), source=str(tmp_path / "tiny-wan"))
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


def test_module_level_run_comparison(tmp_path):
    result = run_comparison(request(acceleration=ToMeConfig(ratio=0.5)), out_dir=tmp_path)
    assert result.ok and (tmp_path / "result.json").exists()


def test_cli_prints_a_table_and_writes_the_files(tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "vdtome", "compare", "--preset", "tiny-wan", "--prompt", PROMPT, "--ratio", "0.5",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "end-to-end latency" in done.stdout and "merge ratio (requested / effective)" in done.stdout
    assert {p.name for p in out.iterdir()} >= {"baseline.mp4", "accelerated.mp4", "side_by_side.mp4", "difference.mp4",
                                                 "result.json"}
    bad = subprocess.run(
        [sys.executable, "-m", "vdtome", "compare", "--preset", "tiny-wan", "--prompt", PROMPT, "--ratio", "1.2"],
        capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2 and "ratio must be a number in [0, 1)" in bad.stderr
