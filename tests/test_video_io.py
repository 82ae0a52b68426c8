"""vdtome.engine.video_io: MP4 encoding properties, composition and difference videos."""

import imageio_ffmpeg
import numpy as np
import pytest

from vdtome.engine.video_io import (
    difference_heat_map,
    display_factor,
    enlarge,
    heat_colours,
    heat_scale_stops,
    probe,
    read_mp4,
    side_by_side,
    write_frames,
    write_mp4,
)


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


def test_difference_heat_map_is_normalised_not_black():
    a = smooth_video(4, 32, 32) * 0.9
    same, largest = difference_heat_map(a, a.copy())
    assert largest == 0.0 and same.dtype == np.uint8 and same.shape == a.shape
    assert (same == heat_colours(np.zeros(1, np.uint8))[0]).all()  # the darkest colour everywhere
    b = a.copy()
    b[2, 5:9, 5:9] += 0.002  # about 55 dB: x4 amplification would still round to black
    heat, largest = difference_heat_map(a, b)
    assert largest == pytest.approx(0.002, abs=1e-6)
    hottest = heat_colours(np.full(1, 255, np.uint8))[0]
    assert (heat[2, 5:9, 5:9] == hottest).all() and (heat[2, 0, 0] != hottest).any()
    assert (heat[0] == heat[0, 0, 0]).all()  # unchanged frames stay at the cold end
    stops = heat_scale_stops(5)
    assert len(stops) == 5 and stops[0] != stops[-1] and all(len(s) == 7 and s[0] == "#" for s in stops)
    with pytest.raises(ValueError, match="shape mismatch"):
        difference_heat_map(a, a[:2])


def test_enlarge_is_nearest_neighbour_by_a_whole_factor():
    video = (np.arange(2 * 3 * 4 * 3).reshape(2, 3, 4, 3) % 256).astype(np.uint8)
    assert display_factor(3, 320) == 107 and display_factor(76, 320) == 5 and display_factor(480, 320) == 1
    big = enlarge(video, 3)
    assert big.shape == (2, 9, 12, 3)
    assert set(np.unique(big)) == set(np.unique(video))  # no interpolated values
    assert (big[:, 3:6, 6:9] == video[:, 1:2, 2:3]).all()
    assert enlarge(video, 1) is video


@pytest.mark.slow
def test_write_frames_is_lossless(tmp_path):
    video = (np.random.default_rng(0).random((3, 10, 14, 3)) * 255).astype(np.uint8)
    paths = write_frames(video, tmp_path / "frames", "baseline")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["baseline_000.png", "baseline_001.png", "baseline_002.png"]
    import cv2
    assert (cv2.imread(paths[1])[..., ::-1] == video[1]).all()
