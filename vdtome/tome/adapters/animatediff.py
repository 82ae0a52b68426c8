"""AnimateDiff (``UNetMotionModel``): ToMe for SD inside the spatial transformer blocks.

Spatial ``BasicTransformerBlock``s see one frame at a time, (B * F, h * w, C), so they merge on a
T = 1 grid whose size follows the UNet level. Motion modules attend over (B * h * w, F, C) with an
added position embedding and are never patched.
"""

from __future__ import annotations

import math

from ...merge import Grid
from ..hooks import DenoiserState, MergeSite
from .base import Adapter

SITES = (
    MergeSite("self_attn", "attn1"),
    MergeSite("cross_attn", "attn2"),
    MergeSite("ffn", "ff"),
)


def _spatial_blocks(model):
    return [
        module
        for name, module in model.named_modules()
        if type(module).__name__ == "BasicTransformerBlock" and ".attentions." in f".{name}" and "motion_modules" not in name
    ]


def _level_grid(state: DenoiserState, num_tokens: int) -> Grid:
    """The (1, h, w) grid of a UNet level, from the latent size (as ToMe for SD computes it)."""
    if state.latent_size is None:
        raise RuntimeError("vdtome: a patched block ran outside a call of its UNet")
    _, height, width = state.latent_size
    downsample = math.ceil(math.sqrt((height * width) // num_tokens))
    grid = (1, math.ceil(height / downsample), math.ceil(width / downsample))
    if math.prod(grid) != num_tokens:
        raise ValueError(f"vdtome: cannot place {num_tokens} tokens on a level of the {height}x{width} latent")
    return grid


def _latent_size(model, call):
    sample = call["sample"]  # (B, C, F, H, W)
    return None, (sample.shape[2], sample.shape[3], sample.shape[4])


ADAPTER = Adapter(
    name="animatediff",
    model_classes=("UNetMotionModel",),
    blocks=_spatial_blocks,
    sites=lambda block: SITES,
    read_grid=_latent_size,
    token_grid=_level_grid,
)
