"""vdtome.engine.fidelity: known-answer checks for fidelity and temporal-consistency metrics."""

import dataclasses
import json
import math

import cv2
import numpy as np
import pytest

from vdtome.core.frames import check_finite
from vdtome.engine.fidelity import PSNR_CAP_DB, Fidelity, Temporal, fidelity, temporal_consistency


def smooth_texture(h=64, w=64, seed=0):
    """Blurred noise around mid-grey: textured enough for flow, smooth enough to track."""
    rng = np.random.default_rng(seed)
    noise = rng.random((h, w, 3)).astype(np.float32)
    pad = 8  # blur a wrap-padded copy so the texture tiles seamlessly under np.roll
    padded = np.pad(noise, ((pad, pad), (pad, pad), (0, 0)), mode="wrap")
    blurred = cv2.GaussianBlur(padded, (0, 0), sigmaX=2.0)[pad:-pad, pad:-pad]
    blurred = (blurred - blurred.mean()) / blurred.std()
    return np.clip(0.5 + 0.15 * blurred, 0.0, 1.0).astype(np.float64)


def moving_video(frames=6, step=2):
    """Constant horizontal motion of ``step`` px per frame (wrap-around)."""
    base = smooth_texture()
    return np.stack([np.roll(base, step * t, axis=1) for t in range(frames)])


def test_identical_videos():
    video = moving_video()
    fid = fidelity(video, video.copy())
    assert fid.identical is True
    assert fid.mse_mean == 0.0 and fid.max_abs_error == 0.0
    assert fid.psnr == (PSNR_CAP_DB,) * len(video) and fid.psnr_mean == PSNR_CAP_DB
    assert fid.ssim_mean == pytest.approx(1.0, abs=1e-9)
    assert len(fid.mse) == len(fid.ssim) == len(video)


def test_gaussian_noise_known_variance():
    sigma = 0.05
    rng = np.random.default_rng(1)
    base = np.full((4, 64, 64, 3), 0.5)
    noisy = base + rng.normal(0.0, sigma, base.shape)
    assert noisy.min() > 0.0 and noisy.max() < 1.0  # no clipping, so the variance is exact

    fid = fidelity(base, noisy)
    assert fid.identical is False
    assert fid.mse_mean == pytest.approx(sigma**2, rel=0.03)
    for m in fid.mse:
        assert m == pytest.approx(sigma**2, rel=0.05)
    expected_psnr = 10 * math.log10(1 / sigma**2)  # 26.02 dB
    assert abs(fid.psnr_mean - expected_psnr) < 0.2
    assert 0.0 < fid.ssim_mean < 0.9
    assert fid.max_abs_error == pytest.approx(np.abs(noisy - base).max())


def test_more_noise_is_worse():
    rng = np.random.default_rng(2)
    base = moving_video(frames=2)
    small = fidelity(base, base + rng.normal(0, 0.01, base.shape))
    large = fidelity(base, base + rng.normal(0, 0.05, base.shape))
    assert small.psnr_mean > large.psnr_mean + 10  # 5x sigma -> ~14 dB
    assert small.ssim_mean > large.ssim_mean


def test_uint8_equals_float_over_255():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    fu = fidelity(a, b)
    ff = fidelity(a / 255.0, b / 255.0)
    assert fu.mse == pytest.approx(ff.mse) and fu.ssim == pytest.approx(ff.ssim)
    tu, tf = temporal_consistency(a), temporal_consistency(a / 255.0)
    assert tu.frame_diff == pytest.approx(tf.frame_diff)


def test_shifted_copy_flow_explains_motion():
    video = moving_video(frames=6, step=2)
    temporal = temporal_consistency(video)
    assert temporal.pairs == 5 and len(temporal.frame_diff) == len(temporal.warp_error) == 5
    assert temporal.frame_diff_mean > 0.02
    # optical flow compensates the motion: residual far below the raw frame change
    assert temporal.warp_error_mean < 0.25 * temporal.frame_diff_mean

    shifted = np.roll(video, 2, axis=2)
    fid = fidelity(video, shifted)
    assert fid.ssim_mean < 0.9 and fid.identical is False


def test_flicker_raises_warp_error():
    video = moving_video(frames=6, step=2)
    flicker = video + np.array([0.0, 0.08] * 3)[:, None, None, None]  # alternate brightness
    steady, flickering = temporal_consistency(video), temporal_consistency(flicker)
    assert flickering.warp_error_mean > steady.warp_error_mean + 0.04


def test_static_video():
    video = np.repeat(smooth_texture()[None], 5, axis=0)
    temporal = temporal_consistency(video)
    assert temporal.frame_diff == (0.0,) * 4 and temporal.frame_diff_mean == 0.0
    assert temporal.warp_error_mean < 1e-3
    assert max(temporal.warp_error) < 1e-3


def test_single_frame_video_has_no_pairs():
    temporal = temporal_consistency(smooth_texture()[None])
    assert temporal == Temporal(frame_diff=(), warp_error=(), frame_diff_mean=0.0, warp_error_mean=0.0, pairs=0)
    assert json.loads(json.dumps(temporal.to_dict(), allow_nan=False))["pairs"] == 0


def test_shape_mismatch_message_names_both_shapes():
    a, b = np.zeros((3, 16, 16, 3)), np.zeros((3, 16, 18, 3))
    with pytest.raises(ValueError, match=r"\(3, 16, 16, 3\).*\(3, 16, 18, 3\)"):
        fidelity(a, b)
    with pytest.raises(ValueError, match="frames, height, width, 3"):
        temporal_consistency(np.zeros((3, 16, 16)))


def test_non_finite_values_are_rejected():
    a = np.zeros((2, 8, 8, 3))
    b = a.copy()
    b[0, 0, 0, 0] = np.nan
    b[1, 2, 3, 1] = np.inf
    assert check_finite(b, "b") == 2 and check_finite(a, "a") == 0
    assert check_finite(np.zeros((1, 4, 4, 3), np.uint8), "u8") == 0
    with pytest.raises(ValueError, match=r"other: contains 2 non-finite"):
        fidelity(a, b)
    with pytest.raises(ValueError, match=r"reference: contains 2 non-finite"):
        fidelity(b, a)
    with pytest.raises(ValueError, match=r"video: contains 2 non-finite"):
        temporal_consistency(b)


def test_tiny_frames():
    a = np.full((1, 3, 5, 3), 0.5)
    b = a + 0.1
    assert fidelity(a, b).mse_mean == pytest.approx(0.01)  # win_size shrinks to 3
    with pytest.raises(ValueError, match="at least 3x3"):
        fidelity(np.zeros((1, 2, 8, 3)), np.zeros((1, 2, 8, 3)))


def test_to_dict_is_strict_json():
    video = moving_video(frames=3)
    for result in (fidelity(video, video), fidelity(video, video + 0.01), temporal_consistency(video)):
        d = result.to_dict()
        text = json.dumps(d, allow_nan=False)
        assert json.loads(text) == d
    d = fidelity(video, video).to_dict()
    assert d["psnr_mean"] == PSNR_CAP_DB and d["identical"] is True and isinstance(d["mse"], list)


def test_results_are_frozen():
    video = moving_video(frames=2)
    fid = fidelity(video, video)
    assert isinstance(fid, Fidelity)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fid.mse_mean = 1.0
