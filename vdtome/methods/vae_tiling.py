"""Tiled VAE decoding as a plug-in: diffusers' own ``enable_tiling``, undone exactly.

The decoder runs on overlapping spatial tiles blended at their seams, so its activations are those
of one tile, not of the whole frame: the decode's peak falls, the output changes slightly at the
seams (fidelity says how much) and the decode takes longer. Removal restores the VAE's tiling
switch and tile sizes as they were.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vdtome.core.validation import RequestError
from vdtome.methods.base import Deferred, Method
from vdtome.methods.schema import check_settings, config_values, form_fields, setting

NAME = "vae_tiling"


@dataclass(frozen=True)
class VaeTiling:
    """``tile_px``: tile side in pixels (0: the VAE's own default; tiles overlap by a quarter)."""

    tile_px: int = setting(0, "Tile size (px)", "decode in tiles of this many pixels a side, overlapping by a quarter; "
                           "0: the VAE's own default (frames no larger than one tile are not tiled)", 0, 2048, 16,
                           sweepable=True, sweep_example="64, 128, 256, 512")

    def __post_init__(self) -> None:
        check_settings(self, NAME)
        if 0 < self.tile_px < 32:
            raise RequestError(f"tile size must be 0 (the VAE's default) or at least 32 px, got {self.tile_px}",
                               f"{NAME}_tile_px")


FIELDS = form_fields(VaeTiling, NAME)


def parse(values: Mapping[str, Any]) -> VaeTiling:
    return VaeTiling(**config_values(VaeTiling, NAME, values))


def summary(config: VaeTiling) -> str:
    return f"tiles {config.tile_px} px" if config.tile_px else "tiles of the VAE's default size"


METHOD = Method(
    name=NAME,
    label="VAE tiling",
    config_type=VaeTiling,
    apply=Deferred("vdtome.methods.vae_tiling_hooks", "AppliedVaeTiling"),
    fields=FIELDS,
    parse=parse,
    summary=summary,
    steps_alike=lambda config: True,
    changes_memory=True,
    docs="decodes the video in overlapping spatial tiles (diffusers enable_tiling): a lower decode peak, small "
         "changes at the seams",
)
