"""VAE tiling's hooks (its declaration, config and form are in :mod:`vdtome.methods.vae_tiling`):
diffusers' ``enable_tiling`` with the tile size asked, a count of the decoder calls made on tiles,
and the VAE's tiling switch and tile sizes restored on removal.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.hooks import ModelHook

from vdtome.core.phases import VAE_DECODE
from vdtome.methods.base import Evidence, MethodReport
from vdtome.methods.module_hooks import attach, detach
from vdtome.methods.vae_tiling import NAME, VaeTiling, summary

HOOK = "vdtome_vae_tiling"
# The VAE attributes ``enable_tiling`` sets (per class; saved and restored when present).
TILE_ATTRIBUTES = ("use_tiling", "tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height",
                   "tile_sample_stride_width", "tile_sample_min_size", "tile_latent_min_size",
                   "tile_latent_min_height", "tile_latent_min_width", "tile_overlap_factor_height",
                   "tile_overlap_factor_width")


def tile_settings(vae: Any, tile_px: int) -> dict[str, int]:
    """``enable_tiling``'s keyword arguments for square tiles of ``tile_px`` overlapping by a quarter,
    as far as this VAE's ``enable_tiling`` takes them."""
    if not tile_px:
        return {}
    parameters = inspect.signature(vae.enable_tiling).parameters
    wanted = {"tile_sample_min_height": tile_px, "tile_sample_min_width": tile_px,
              "tile_sample_stride_height": tile_px * 3 // 4, "tile_sample_stride_width": tile_px * 3 // 4}
    return {key: value for key, value in wanted.items() if key in parameters}


class _TileCount(ModelHook):
    """Counts decoder calls made inside ``tiled_decode`` (one per tile, per frame chunk)."""

    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__()
        self.counts = counts

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.counts["inside"]:
            self.counts["tiles"] += 1
        return self.fn_ref.original_forward(*args, **kwargs)


class AppliedVaeTiling:
    def __init__(self, pipe: Any, config: VaeTiling) -> None:
        vae = getattr(pipe, "vae", None)
        if vae is None or not hasattr(vae, "enable_tiling") or not hasattr(vae, "tiled_decode"):
            raise TypeError(f"{type(vae).__name__} has no tiled decode in diffusers")
        kwargs = tile_settings(vae, config.tile_px)
        if config.tile_px and "tile_sample_stride_height" not in kwargs and not hasattr(vae, "tile_sample_min_size"):
            # CogVideoX's tiles overlap by fixed factors, and other sizes than its own change the video's size.
            raise TypeError(f"{type(vae).__name__} decodes in tiles of its own size only; use tile size 0")
        self.config = config
        self.vae = vae
        self.saved = {name: getattr(vae, name) for name in TILE_ATTRIBUTES if hasattr(vae, name)}
        # A preset that decodes in tiles already (its loader enabled tiling) changes only if the size does.
        self.unchanged = bool(self.saved.get("use_tiling")) and not config.tile_px
        self.counts = {"inside": 0, "tiles": 0, "decodes": 0}
        tiled_decode = vae.tiled_decode

        def counted_tiled_decode(*args, **kwargs):
            self.counts["decodes"] += 1
            self.counts["inside"] += 1
            try:
                return tiled_decode(*args, **kwargs)
            finally:
                self.counts["inside"] -= 1

        attach([vae.decoder], lambda module: _TileCount(self.counts), HOOK, [vae])
        vae.tiled_decode = counted_tiled_decode  # an instance attribute: removal uncovers the method
        try:
            vae.enable_tiling(**kwargs)
            if config.tile_px and not kwargs:  # AutoencoderKL: one square tile size, set as attributes
                factor = vae.tile_sample_min_size // max(vae.tile_latent_min_size, 1)
                vae.tile_sample_min_size, vae.tile_latent_min_size = config.tile_px, config.tile_px // factor
        except BaseException:
            self.remove()
            raise

    def reset(self) -> None:
        self.counts.update(tiles=0, decodes=0)

    def remove(self) -> None:
        vae = self.vae
        vae.__dict__.pop("tiled_decode", None)
        detach([vae], HOOK)
        for name, value in self.saved.items():
            setattr(vae, name, value)

    def report(self) -> MethodReport:
        decodes, tiles = self.counts["decodes"], self.counts["tiles"]
        notes = () if decodes else (f"no decode was tiled: the frames are no larger than one tile of "
                                    f"{type(self.vae).__name__}; choose a smaller tile size to tile them",)
        if self.unchanged:
            notes = ("this preset decodes in tiles of the VAE's default size already (both sides); choose a tile "
                     "size to compare another",)
        return MethodReport(
            method=NAME,
            summary={"settings": summary(self.config)},
            rows=(("tiled VAE decodes", str(decodes), f"{tiles} decoder calls on tiles"),),
            notes=notes,
            detail={"tiled_decodes": decodes, "tile_decoder_calls": tiles, "tile_px": self.config.tile_px},
            evidence=(Evidence("decoder calls on tiles", 0 if self.unchanged else tiles),),
            phases=frozenset({VAE_DECODE}),
        )
