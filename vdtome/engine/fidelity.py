"""Fidelity and temporal-consistency metrics for generated videos.

Videos are numpy arrays of shape (F, H, W, 3): float in [0, 1] (what diffusers returns
with ``output_type="np"``) or uint8 (divided by 255). Token merging trades exactness for
speed, so we need two questions answered: how far did the accelerated video drift from the
baseline (``fidelity``), and did acceleration make the video flicker (``temporal_consistency``).

SSIM comes from scikit-image and optical flow / warping from OpenCV rather than being
re-implemented here, so the numbers match what others report with the same tools.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from skimage.metrics import structural_similarity

from vdtome.core.frames import as_float_video

#: PSNR is infinite for identical frames and JSON cannot carry ``inf``; identical frames
#: therefore report this value (and ``Fidelity.identical`` says so explicitly). 100 dB is
#: far above anything lossy (8-bit quantisation alone is ~59 dB), so it cannot be confused
#: with a real measurement.
PSNR_CAP_DB = 100.0

#: Farneback parameters (OpenCV's documented example values). ``winsize=15`` averages
#: enough pixels to be robust to the mild noise of diffusion outputs while the 3-level
#: pyramid catches motion of several pixels per frame, even on 64x64 test videos.
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


def _json_float(x: float) -> float:
    x = float(x)
    if not math.isfinite(x):  # cannot happen by construction; guard the JSON contract anyway
        raise ValueError(f"non-finite metric value {x!r}")
    return x


def _to_dict(obj) -> dict:
    out = {}
    for key, value in asdict(obj).items():
        if isinstance(value, (tuple, list)):
            out[key] = [_json_float(v) for v in value]
        elif isinstance(value, bool):
            out[key] = value
        elif isinstance(value, int):
            out[key] = int(value)
        else:
            out[key] = _json_float(value)
    return out


@dataclass(frozen=True)
class Fidelity:
    """Per-frame and mean distance of a video from a reference, in [0, 1] pixel units.

    ``psnr_mean`` is the mean of the per-frame (capped) PSNRs, as video papers usually report.
    """

    mse: tuple[float, ...]
    psnr: tuple[float, ...]
    ssim: tuple[float, ...]
    mse_mean: float
    psnr_mean: float
    ssim_mean: float
    max_abs_error: float
    identical: bool

    def to_dict(self) -> dict:
        return _to_dict(self)


@dataclass(frozen=True)
class Temporal:
    """Frame-to-frame change of one video, in [0, 1] pixel units.

    ``frame_diff`` is raw change between consecutive frames (motion + flicker);
    ``warp_error`` is what is left after compensating motion with optical flow (mostly
    flicker), so comparing the two videos' ``warp_error`` isolates added flicker.
    A single-frame video has ``pairs == 0``, empty per-pair tuples and means of 0.0.
    """

    frame_diff: tuple[float, ...]
    warp_error: tuple[float, ...]
    frame_diff_mean: float
    warp_error_mean: float
    pairs: int

    def to_dict(self) -> dict:
        return _to_dict(self)


def _ssim_win_size(height: int, width: int) -> int:
    side = min(height, width)
    if side < 3:
        raise ValueError(f"SSIM needs frames of at least 3x3 pixels, got {height}x{width}")
    return min(7, side if side % 2 else side - 1)


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB for [0, 1] data, capped at PSNR_CAP_DB (reached when mse == 0)."""
    if mse <= 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(1.0 / mse))


def fidelity(reference, other) -> Fidelity:
    """Compare ``other`` (e.g. the accelerated video) with ``reference`` frame by frame."""
    ref_shape, oth_shape = np.shape(reference), np.shape(other)
    if ref_shape != oth_shape:
        raise ValueError(f"shape mismatch: reference has shape {ref_shape}, other has shape {oth_shape}")
    ref = as_float_video(reference, "reference")
    oth = as_float_video(other, "other")
    win = _ssim_win_size(ref.shape[1], ref.shape[2])

    diff = oth - ref
    mse = tuple(float(v) for v in np.mean(diff**2, axis=(1, 2, 3)))
    psnr = tuple(psnr_from_mse(m) for m in mse)
    ssim = tuple(
        float(structural_similarity(r, o, channel_axis=-1, data_range=1.0, win_size=win)) for r, o in zip(ref, oth)
    )
    max_abs = float(np.max(np.abs(diff)))
    return Fidelity(
        mse=mse,
        psnr=psnr,
        ssim=ssim,
        mse_mean=float(np.mean(mse)),
        psnr_mean=float(np.mean(psnr)),
        ssim_mean=float(np.mean(ssim)),
        max_abs_error=max_abs,
        identical=max_abs == 0.0,
    )


def _gray_u8(frame: np.ndarray) -> np.ndarray:
    u8 = np.clip(np.rint(frame * 255.0), 0, 255).astype(np.uint8)
    return cv2.cvtColor(u8, cv2.COLOR_RGB2GRAY)


def warp_to_next(frame: np.ndarray, next_frame: np.ndarray) -> np.ndarray:
    """Warp ``frame`` (t) onto ``next_frame`` (t+1) with backward Farneback flow.

    Backward flow (t+1 -> t) gives, for every pixel of t+1, where it came from in t, so
    ``cv2.remap`` can pull values without holes. Borders replicate instead of turning black,
    which would otherwise be counted as error for content entering the frame.
    """
    flow = cv2.calcOpticalFlowFarneback(_gray_u8(next_frame), _gray_u8(frame), None, **FARNEBACK)
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x, map_y = gx + flow[..., 0], gy + flow[..., 1]
    return cv2.remap(
        frame.astype(np.float32), map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def temporal_consistency(video) -> Temporal:
    """Frame difference and flow-compensated warping error between consecutive frames."""
    vid = as_float_video(video, "video")
    frame_diff, warp_error = [], []
    for t in range(vid.shape[0] - 1):
        cur, nxt = vid[t], vid[t + 1]
        frame_diff.append(float(np.mean(np.abs(nxt - cur))))
        warp_error.append(float(np.mean(np.abs(warp_to_next(cur, nxt) - nxt))))
    return Temporal(
        frame_diff=tuple(frame_diff),
        warp_error=tuple(warp_error),
        frame_diff_mean=float(np.mean(frame_diff)) if frame_diff else 0.0,
        warp_error_mean=float(np.mean(warp_error)) if warp_error else 0.0,
        pairs=len(frame_diff),
    )
