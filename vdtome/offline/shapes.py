"""Synthetic "shapes" videos with a name, for the small trained offline model (no diffusers here).

Why: offline we cannot download a real video model, and random weights show noise. A model trained
on clips whose content is fully named by their prompt ("a red circle moving left quickly on a gray
background") can be judged in code: the clip's dominant foreground colour and its motion direction
either match the prompt or not (:func:`judge`).

Everything is seeded and reproducible. A fixed, seeded share of the (colour, shape, direction,
background) combinations is held out of training (:data:`HELD_OUT`); the acceptance prompts come from
those combinations only.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

import numpy as np

#: Foreground colours (sRGB, 0-255): six hues 60 degrees apart, far apart in RGB.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "yellow": (235, 215, 30),
    "green": (35, 185, 55),
    "cyan": (30, 205, 215),
    "blue": (40, 70, 230),
    "magenta": (215, 40, 205),
}
#: Backgrounds: named by words no foreground uses, so a prompt's colour word is never ambiguous.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (120, 120, 120),
}
SHAPES = ("circle", "square", "triangle")
#: Unit motion per direction in image coordinates (x right, y down).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
#: Share of the frame side a shape travels over the whole clip, whatever its length and size
#: (9 frames of 64 x 64: 1.5 and 3 px per frame; 17 frames of 128 x 128: the same 1.5 and 3 px).
SPEEDS: dict[str, float] = {"slowly": 0.1875, "quickly": 0.375}

#: Half the side of a shape's bounding box, as a share of the frame side (64 px -> 11 px, 128 px -> 22 px):
#: a circle covers 9.1 % of the frame, a square 9.4 %, a triangle 5.8 %.
SHAPE_RADIUS = 0.17
PROMPT_TEMPLATE = "a {colour} {shape} moving {direction} {speed} on a {background} background"
PROMPT_PATTERN = re.compile(
    r"a (?P<colour>\w+) (?P<shape>\w+) moving (?P<direction>\w+) (?P<speed>\w+) on a (?P<background>\w+) background"
)
#: Share of the (colour, shape, direction, background) combinations never shown in training.
HELD_OUT_SHARE = 0.2
SPLIT_SEED = 20261129


@dataclass(frozen=True)
class Scene:
    """One named clip: the prompt says everything the pixels show except where the shape starts."""

    colour: str
    shape: str
    direction: str
    speed: str
    background: str

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("direction", self.direction, DIRECTIONS),
            ("speed", self.speed, SPEEDS),
            ("background", self.background, BACKGROUNDS),
        ):
            if value not in allowed:
                raise ValueError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(**self.__dict__)

    @property
    def combination(self) -> tuple[str, str, str, str]:
        return (self.colour, self.shape, self.direction, self.background)

    @classmethod
    def from_prompt(cls, prompt: str) -> Scene:
        match = PROMPT_PATTERN.fullmatch(prompt.strip().lower())
        if match is None:
            raise ValueError(f"prompt must read {PROMPT_TEMPLATE!r}; got {prompt!r}")
        return cls(**match.groupdict())


def vocabulary() -> list[str]:
    """Every word a prompt can contain (the tokenizer's vocabulary)."""
    words = set(PROMPT_TEMPLATE.replace("{", " ").replace("}", " ").split())
    words -= {"colour", "shape", "direction", "speed", "background"}
    words |= {*COLOURS, *SHAPES, *DIRECTIONS, *SPEEDS, *BACKGROUNDS, "background"}
    return sorted(words)


def _all_combinations() -> list[tuple[str, str, str, str]]:
    return list(itertools.product(COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS))


def _split() -> tuple[frozenset, frozenset]:
    combos = _all_combinations()
    held = set(random.Random(SPLIT_SEED).sample(combos, round(HELD_OUT_SHARE * len(combos))))
    return frozenset(c for c in combos if c not in held), frozenset(held)


TRAIN_COMBINATIONS, HELD_OUT = _split()


def held_out_scenes(count: int, seed: int = 0) -> list[Scene]:
    """``count`` scenes from held-out combinations (seeded; speeds drawn too)."""
    rng = random.Random(seed)
    combos = sorted(HELD_OUT)
    rng.shuffle(combos)
    if count > len(combos):
        raise ValueError(f"only {len(combos)} held-out combinations exist; asked for {count}")
    return [Scene(c, s, d, rng.choice(sorted(SPEEDS)), b) for c, s, d, b in combos[:count]]


def random_training_scene(rng: random.Random) -> Scene:
    colour, shape, direction, background = rng.choice(sorted(TRAIN_COMBINATIONS))
    return Scene(colour, shape, direction, rng.choice(sorted(SPEEDS)), background)


def _shape_mask(shape: str, cx: float, cy: float, radius: float, side: int, supersample: int) -> np.ndarray:
    """Anti-aliased coverage (side, side) in [0, 1] of a shape centred at (cx, cy), by supersampling."""
    n = side * supersample
    coords = (np.arange(n) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords)
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= radius * 0.9) & (np.abs(y - cy) <= radius * 0.9)
    else:  # triangle pointing up, same bounding box as the circle
        top, bottom = cy - radius, cy + radius
        half_width = (y - top) / (2 * radius) * radius
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    return inside.reshape(side, supersample, side, supersample).mean(axis=(1, 3))


def render(scene: Scene, rng: random.Random, frames: int = 9, side: int = 64, supersample: int = 4) -> np.ndarray:
    """A clip (frames, side, side, 3) uint8: the shape crosses the frame along its direction.

    The start is drawn so the whole path stays inside the frame; across the path the position is free.
    """
    radius = SHAPE_RADIUS * side
    travel = SPEEDS[scene.speed] * side
    step = travel / max(frames - 1, 1)
    dx, dy = DIRECTIONS[scene.direction]
    margin = radius + 1
    along = rng.uniform(margin, side - margin - travel)  # start, measured along the motion
    across = rng.uniform(margin, side - margin)
    background = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    colour = np.array(COLOURS[scene.colour], dtype=np.float32)
    clip = np.empty((frames, side, side, 3), dtype=np.uint8)
    for i in range(frames):
        position = along + step * i
        if dx:
            cx, cy = (position if dx > 0 else side - position), across
        else:
            cx, cy = across, (position if dy > 0 else side - position)
        cover = _shape_mask(scene.shape, cx, cy, radius, side, supersample)[..., None]
        clip[i] = np.clip(np.rint(background * (1 - cover) + colour * cover), 0, 255).astype(np.uint8)
    return clip


# ------------------------------------------------------------------------------------------- judge


@dataclass(frozen=True)
class Verdict:
    """What the judge read from a clip, and whether it matches the prompt's scene."""

    colour: str | None
    direction: str | None
    displacement: tuple[float, float]  # centroid motion (x, y) in pixels, first to last frame
    foreground_share: float  # mean share of pixels read as foreground
    colour_right: bool
    direction_right: bool


def _nearest(table: dict[str, tuple[int, int, int]], rgb: np.ndarray) -> str:
    names = list(table)
    distances = [float(np.sum((rgb - np.array(table[n], dtype=np.float32)) ** 2)) for n in names]
    return names[int(np.argmin(distances))]


def foreground_masks(clip: np.ndarray, threshold: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame foreground masks (frames, H, W) and the background colour (the border's median).

    A pixel is foreground where it differs from the background colour by more than ``threshold`` in
    RGB distance (0-255 scale).
    """
    pixels = clip.astype(np.float32)
    border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], axis=1)
    background = np.median(border.reshape(-1, 3), axis=0)
    distance = np.sqrt(np.sum((pixels - background) ** 2, axis=-1))
    return distance > threshold, background


def judge(clip: np.ndarray, scene: Scene, min_motion: float = 2.0) -> Verdict:
    """Dominant foreground colour (nearest named colour to the foreground's median) and motion
    direction (the foreground centroid's displacement from the first to the last frames, larger
    axis; under ``min_motion`` pixels it is no direction) of a uint8 clip (frames, H, W, 3)."""
    masks, _ = foreground_masks(clip)
    pixels = clip.astype(np.float32)
    colour = None
    if masks.any():
        colour = _nearest(COLOURS, np.median(pixels[masks], axis=0))
    centroids = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        centroids.append((xs.mean(), ys.mean()) if len(xs) else (np.nan, np.nan))
    centroids = np.array(centroids)
    k = max(1, len(centroids) // 3)  # average a third at each end: robust to one odd frame

    def mean_of(rows: np.ndarray) -> np.ndarray:
        found = rows[np.all(np.isfinite(rows), axis=1)]
        return found.mean(axis=0) if len(found) else np.full(2, np.nan)

    shift = mean_of(centroids[-k:]) - mean_of(centroids[:k])
    direction = None
    if np.all(np.isfinite(shift)) and np.max(np.abs(shift)) >= min_motion:
        if abs(shift[0]) >= abs(shift[1]):
            direction = "right" if shift[0] > 0 else "left"
        else:
            direction = "down" if shift[1] > 0 else "up"
    return Verdict(
        colour=colour,
        direction=direction,
        displacement=(float(shift[0]), float(shift[1])) if np.all(np.isfinite(shift)) else (float("nan"),) * 2,
        foreground_share=float(masks.mean()),
        colour_right=colour == scene.colour,
        direction_right=direction == scene.direction,
    )
