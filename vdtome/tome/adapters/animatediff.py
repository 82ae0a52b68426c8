"""AnimateDiff (``UNetMotionModel``): ToMe for SD inside the spatial transformer blocks.

Spatial ``BasicTransformerBlock``s see one frame at a time, (B * F, h * w, C), so they merge on a
T = 1 grid whose size follows the UNet level. Motion modules attend over (B * h * w, F, C) with an
added position embedding and are never patched.
"""

from __future__ import annotations

import math

from vdtome.tome.adapters.base import Adapter
from vdtome.tome.merge import Grid
from vdtome.tome.sites import DenoiserState, MergeSite

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
    """The (1, h, w) grid of the UNet level that holds ``num_tokens`` tokens per frame.

    Each down level halves the latent with a stride-2, padding-1 convolution, so level k has
    ``ceil(h / 2)`` applied k times to each side (odd sides round up: a 33x36 latent has levels
    33x36, 17x18, 9x9, 5x5); up levels are resized to their skip's size. ToMe for SD's shortcut
    (one downsampling factor from sqrt(h * w / N)) misplaces such levels.
    """
    if state.latent_size is None:
        raise RuntimeError("vdtome: a patched block ran outside a call of its UNet")
    _, height, width = state.latent_size
    h, w = height, width
    while h * w > num_tokens and (h, w) != (1, 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != num_tokens:
        raise ValueError(f"vdtome: no UNet level of the {height}x{width} latent holds {num_tokens} tokens")
    return (1, h, w)


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
    frames_attended=False,
)
