"""vdtome.video_io: MP4 encoding properties, composition and difference videos."""

import numpy as np
import pytest

import imageio_ffmpeg
from vdtome.video_io import difference_video, probe, read_mp4, side_by_side, write_mp4


def smooth_video(frames=17, h=64, w=64):
    """Gradients that move over time: smooth, so H.264 at crf 18 reproduces them closely."""
    t = np.arange(frames)[:, None, None]
    y = np.linspace(0, 1, h)[None, :, None]
    x = np.linspace(0, 1, w)[None, None, :]
    r = 0.5 + 0.4 * np.sin(2 * np.pi * (x + t / frames))
    g = 0.5 + 0.4 * np.cos(2 * np.pi * (y - t / frames))
    b = 0.25 + 0.5 * x * y + 0 * t
    return np.stack(np.broadcast_arrays(r, g, b), axis=-1)


def test_write_mp4_h264_yuv420p_faststart(tmp_path):
    video = smooth_video(17, 64, 64)
    path = write_mp4(video, tmp_path / "v.mp4", fps=8)
    info = probe(path)
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert (info["width"], info["height"], info["frames"]) == (64, 64, 17)
    assert info["fps"] == pytest.approx(8.0)
    assert info["faststart"] is True

    decoded = read_mp4(path)
    assert decoded.shape == (17, 64, 64, 3)
    assert np.mean(np.abs(decoded / 255.0 - video)) < 0.05


def test_write_mp4_uint8_and_fps(tmp_path):
    video = (smooth_video(5, 32, 48) * 255).round().astype(np.uint8)
    info = probe(write_mp4(video, tmp_path / "u.mp4", fps=24))
    assert (info["width"], info["height"], info["frames"]) == (48, 32, 5)
    assert info["fps"] == pytest.approx(24.0)


def test_odd_size_is_padded_to_even(tmp_path):
    video = smooth_video(17, 63, 65)  # H=63, W=65
    path = write_mp4(video, tmp_path / "odd.mp4", fps=8)
    info = probe(path)
    assert (info["width"], info["height"], info["frames"]) == (66, 64, 17)
    decoded = read_mp4(path) / 255.0
    assert np.mean(np.abs(decoded[:, :63, :65] - video)) < 0.05  # original pixels not rescaled
    # padding replicates the edge instead of adding a black border
    assert np.mean(np.abs(decoded[:, 63, :65] - video[:, 62])) < 0.05
    assert np.mean(np.abs(decoded[:, :63, 65] - video[:, :, 64])) < 0.05


def test_probe_detects_missing_faststart(tmp_path):
    path = str(tmp_path / "slow.mp4")
    writer = imageio_ffmpeg.write_frames(path, (32, 32), fps=8, macro_block_size=1, ffmpeg_log_level="error")
    writer.send(None)
    for frame in (smooth_video(3, 32, 32) * 255).astype(np.uint8):
        writer.send(frame.tobytes())
    writer.close()
    info = probe(path)
    assert info["frames"] == 3 and info["faststart"] is False


def test_probe_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        probe(tmp_path / "nope.mp4")


def test_side_by_side_layout_and_labels():
    a, b = smooth_video(5, 64, 64), smooth_video(5, 64, 64)[::-1]
    out = side_by_side(a, b, gap=6)
    assert out.dtype == np.uint8 and out.shape[0] == 5
    header = out.shape[1] - 64
    assert header > 0 and out.shape[2] == 2 * 64 + 6
    # video areas hold the inputs, unchanged apart from uint8 rounding
    assert np.array_equal(out[:, header:, :64], np.rint(a * 255).astype(np.uint8))
    assert np.array_equal(out[:, header:, 70:], np.rint(b * 255).astype(np.uint8))

    blank = side_by_side(a, b, labels=("", ""), gap=6)
    assert np.array_equal(blank[:, header:], out[:, header:])
    assert not np.any(blank[:, :header, :64])  # empty header band
    left = out[0, :header, :64].astype(int).sum()
    right = out[0, :header, 70:].astype(int).sum()
    assert left > 0 and right > 0  # both labels drawn

    only_left = side_by_side(a, b, labels=("A", ""), gap=6)
    assert only_left[0, :header, :64].any() and not only_left[0, :header, 70:].any()


def test_side_by_side_scales_to_720p():
    frame = np.zeros((1, 720, 1280, 3), np.uint8)
    out = side_by_side(frame, frame)
    header = out.shape[1] - 720
    assert 60 <= header <= 120
    ink_rows = np.flatnonzero(out[0, :header, :1280].any(axis=(1, 2)))
    assert ink_rows.size > header // 3  # the text fills a good part of the band, not a few pixels


def test_side_by_side_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 64, 64, 3\).*\(3, 64, 64, 3\)"):
        side_by_side(np.zeros((2, 64, 64, 3)), np.zeros((3, 64, 64, 3)))


def test_difference_video():
    a = smooth_video(4, 32, 32)
    assert not difference_video(a, a.copy()).any()
    diff = difference_video(a, a + 0.01)  # default gain 4
    assert diff.shape == a.shape and diff.dtype == np.float32
    assert np.allclose(diff, 0.04, atol=1e-6)
    assert np.allclose(difference_video(a, a + 0.01, gain=10), 0.1, atol=1e-6)
    assert difference_video(np.zeros_like(a), np.ones_like(a)).max() == 1.0  # clipped
    with pytest.raises(ValueError, match="shape mismatch"):
        difference_video(a, a[:2])
