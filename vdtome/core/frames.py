"""The video array convention every layer shares: (F, H, W, 3), float in [0, 1] or uint8.

Fidelity metrics, MP4 writing and the offline model's training all read videos through these, so a
malformed or diverged (NaN) video is refused the same way everywhere.
"""

from __future__ import annotations

import numpy as np


def check_finite(video, name: str = "video") -> int:
    """Count NaN/inf values; a diverged sampler produces them and they would poison every mean."""
    arr = np.asarray(video)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.inexact):
        return 0  # integers cannot hold NaN/inf
    return int(arr.size - np.count_nonzero(np.isfinite(arr)))



def as_float_video(video, name: str = "video") -> np.ndarray:
    """Validate a (F, H, W, 3) video and return it as float64 in [0, 1] units.

    float64 so that MSE of tiny differences (e.g. 1e-6) is not lost to float32 rounding.
    Float input is not clipped: an out-of-range value is a real difference to report.
    """
    arr = np.asarray(video)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{name}: expected shape (frames, height, width, 3), got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: video has no frames")
    bad = check_finite(arr, name)
    if bad:
        raise ValueError(f"{name}: contains {bad} non-finite value(s) (NaN/inf) out of {arr.size}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return arr.astype(np.float64, copy=False)



def to_uint8(video, name: str = "video") -> np.ndarray:
    """(F, H, W, 3) uint8; floats are clipped to [0, 1] and rounded (not truncated)."""
    arr = np.asarray(video)
    if arr.dtype == np.uint8:
        as_float_video(arr[:1], name)  # shape check only
        return arr
    vid = as_float_video(arr, name)
    return np.clip(np.rint(vid * 255.0), 0, 255).astype(np.uint8)
