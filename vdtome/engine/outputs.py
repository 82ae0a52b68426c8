"""A result's files: the two videos (enlarged for display when small), the side-by-side and difference
videos, and ``result.json``, named after the settings so files of several runs stay apart.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from vdtome.engine import video_io
from vdtome.engine.request import ComparisonResult


def download_stem(result: ComparisonResult) -> str:
    """What a downloaded file's name starts with: preset, stack with its settings, seed
    ("tiny-wan_tome-ratio-0.5-stride-1x2x2_seed0"), so files of several runs stay apart."""
    def slug(text: str) -> str:
        return re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9.+]+", "-", text)).strip("-.")

    s = result.settings
    return f"{slug(s.preset)}_{slug(result.stack)[:120].rstrip('-.')}_seed{s.seed}"


def side_caption(name: str, result: ComparisonResult) -> str:
    """A player's caption: the side and its median denoising time in this request (the figure the
    headline card compares)."""
    median = None if result.timing is None else result.timing.denoising.median_text(name)
    return name if median is None else f"{name}: {median} denoising"


def write_outputs(result: ComparisonResult, folder: Path) -> dict[str, str]:
    """Both videos, the captioned side-by-side, the difference heat map, every frame as PNG and
    ``result.json``, named after the settings (:func:`download_stem`). Small videos are enlarged
    by a whole factor, nearest-neighbour, so that a browser shows their pixels sharp."""
    folder.mkdir(parents=True, exist_ok=True)
    fps, stem = result.settings.fps, download_stem(result)
    videos = {"baseline": result.baseline, "accelerated": result.accelerated}
    shown = {name: _displayable(run.frames) for name, run in videos.items() if run is not None}
    factor = video_io.display_factor(next(iter(shown.values())).shape[1]) if shown else 1
    encodes = {name: video_io.enlarge(frames, factor) for name, frames in shown.items()}  # name -> frames
    if len(shown) == 2:
        captions = tuple(side_caption(name, result) for name in ("baseline", "accelerated"))
        encodes["side_by_side"] = video_io.side_by_side(encodes["baseline"], encodes["accelerated"], captions)
        heat, _ = video_io.difference_heat_map(shown["baseline"], shown["accelerated"])
        encodes["difference"] = video_io.enlarge(heat, factor)
    # Each video is its own ffmpeg process, and PNG encoding releases the GIL: written side by side, a
    # request waits for the slowest file only.
    with ThreadPoolExecutor(max_workers=len(encodes) + len(shown) or 1) as pool:
        written = {name: pool.submit(video_io.write_mp4, frames, folder / f"{stem}_{name.replace('_', '-')}.mp4", fps)
                   for name, frames in encodes.items()}
        pngs = [pool.submit(video_io.write_frames, frames, folder / "frames", name) for name, frames in shown.items()]
        files = {name: job.result() for name, job in written.items()}
        for job in pngs:
            job.result()
    if len(shown) == 2:
        files["frames"] = str(folder / "frames")
    files["json"] = str(folder / f"{stem}_result.json")
    result = replace(result, files=files)
    Path(files["json"]).write_text(result.to_json())
    return files


def _displayable(frames: np.ndarray) -> np.ndarray:
    return np.clip(np.nan_to_num(frames, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
