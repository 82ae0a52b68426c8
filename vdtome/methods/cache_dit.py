"""cache-dit's DBCache as a peer method: the step cache most used with diffusers DiTs, measured by
vdtome's protocol beside vdtome's own methods (its hooks live in :mod:`vdtome.methods.cache_dit_hooks`).

DBCache runs the first ``Fn`` transformer blocks every step; while their residual changes less
than a threshold since the last full step, the middle blocks are skipped and their cached residual
is added (or forecast, with its TaylorSeer calibrator), then the last ``Bn`` blocks run. It is an
optional dependency: ``pip install 'vdtome[peers]'``; without it the method is listed and refused
with that line.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vdtome.core.denoisers import DenoiserType
from vdtome.methods.base import REUSES_BLOCKS, Deferred, Method
from vdtome.methods.schema import check_settings, config_values, form_fields, setting

NAME = "cache_dit"
INSTALL = "pip install 'vdtome[peers]' (cache-dit==1.5.3)"
MAX_BLOCKS = 16  # Fn and Bn in practice (cache-dit's own presets use 1-8); a model's block count caps them too
MAX_STEPS = 100
MAX_ORDER = 4
# cache-dit 1.5.3's adapters for the denoisers vdtome knows, matched as it matches them: the class
# name's prefix (its BlockAdapterRegister keys).
ADAPTED = ("Wan", "CogVideoX", "LTX", "HunyuanVideo", "Mochi", "SkyReelsV2", "Allegro", "EasyAnimate", "Cosmos")


@dataclass(frozen=True)
class CacheDiT:
    """cache-dit's ``DBCacheConfig`` (and ``TaylorSeerCalibratorConfig``) in vdtome's terms.
    Defaults: Fn 1, Bn 0, threshold 0.12, 4 warm-up steps (1.40x at 32 dB on tiny-shapes-128 in the
    probe of issue 36)."""

    compute_first: int = setting(1, "First blocks computed (Fn)", "blocks run every step; the change of their "
                                 "residual decides whether the middle blocks are skipped", 1, MAX_BLOCKS, 1)
    compute_last: int = setting(0, "Last blocks computed (Bn)", "blocks run every step after the cached middle, "
                                "correcting its approximation", 0, MAX_BLOCKS, 1, advanced=True)
    threshold: float = setting(0.12, "Residual threshold", "skip the middle blocks while the first blocks' residual "
                               "changes by less than this (relative L1; 0: never skip)", 0.0, 1.0, 0.01,
                               sweepable=True)
    warmup_steps: int = setting(4, "Warm-up steps", "the first steps never cache", 0, MAX_STEPS, 1,
                                counts_steps=True)
    max_cached_steps: int = setting(0, "Max cached steps", "at most this many steps cached per call (0: no limit)",
                                    0, MAX_STEPS, 1, advanced=True)
    taylorseer: bool = setting(False, "TaylorSeer calibrator", "forecast a skipped residual from past steps (a "
                               "Taylor series) instead of reusing the last one")
    taylorseer_order: int = setting(1, "TaylorSeer order", "", 1, MAX_ORDER, 1, advanced=True)

    def __post_init__(self) -> None:
        check_settings(self, NAME)


FIELDS = form_fields(CacheDiT, NAME)


def parse(values: Mapping[str, Any]) -> CacheDiT:
    return CacheDiT(**config_values(CacheDiT, NAME, values))


def summary(config: CacheDiT) -> str:
    parts = [f"F{config.compute_first}B{config.compute_last} threshold {config.threshold:g}",
             f"warm-up {config.warmup_steps}"]
    if config.max_cached_steps:
        parts.append(f"at most {config.max_cached_steps} cached")
    if config.taylorseer:
        parts.append(f"TaylorSeer order {config.taylorseer_order}")
    return " ".join(parts)


def installed() -> bool:
    return importlib.util.find_spec("cache_dit") is not None


def _unavailable(denoiser_types: tuple[DenoiserType, ...]) -> str | None:
    if not installed():
        return f"cache-dit is not installed: {INSTALL}"
    if all(denoiser.name.startswith(ADAPTED) for denoiser in denoiser_types):
        return None
    names = ", ".join(denoiser.name for denoiser in denoiser_types)
    return f"cache-dit has no adapter for {names} (it adapts {', '.join(ADAPTED)} among vdtome's models)"


METHOD = Method(
    name=NAME,
    label="cache-dit DBCache",
    config_type=CacheDiT,
    apply=Deferred("vdtome.methods.cache_dit_hooks", "AppliedCacheDiT"),
    fields=FIELDS,
    parse=parse,
    summary=summary,
    unavailable=_unavailable,
    reuses_across_steps=REUSES_BLOCKS,
    wraps_denoiser=True,
    measures_first_blocks=lambda config: config.compute_first,
    graph_breaks="cache-dit picks its blocks in eager functions and patches with unittest.mock inside its "
                 "forward",
    docs="cache-dit's Dual Block Cache (a peer library, vdtome[peers]): skips the middle transformer blocks while "
         "the first blocks' residual barely changes; optional TaylorSeer forecast",
)
