"""The demo app's comparison function (the UI around it is exercised by `make run`)."""

import re
import subprocess

import gradio as gr
import imageio_ffmpeg
import pytest

import app


def probe(path):
    """(codec, pixel format, decoded frames) of an mp4, read with imageio-ffmpeg's ffmpeg."""
    log = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-i", path, "-map", "0:v:0", "-f", "null", "-"],
        capture_output=True, text=True,
    ).stderr
    codec, pix_fmt = re.search(r"Video: (\w+).*?, (\w+)\(", log).groups()
    frames = int(re.findall(r"frame=\s*(\d+)", log)[-1])
    return codec, pix_fmt, frames


def test_compare_returns_two_playable_videos_and_metrics():
    base_path, tome_path, summary = app.compare("a red fox runs through fresh snow", 3, 0.5, 2)
    for path in (base_path, tome_path):
        assert probe(path) == ("h264", "yuv420p", app.FRAMES)
    assert "0.50 / 0.50" in summary and "speedup" in summary


def test_ratio_zero_is_identical_and_bad_input_is_refused():
    _, _, summary = app.compare("waves on a beach", 1, 0.0, 1)
    assert "identical" in summary
    with pytest.raises(gr.Error, match="empty"):
        app.compare("   ", 1, 0.5, 1)
    with pytest.raises(gr.Error, match="limit"):
        app.compare("x" * 1000, 1, 0.5, 1)
    # The app keeps serving after a refusal.
    assert app.compare("a boat on a lake", 1, 0.3, 1)[2]
