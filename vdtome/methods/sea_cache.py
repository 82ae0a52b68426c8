"""SeaCache as a plug-in: diffusers' ``SeaCacheConfig`` hooks, not a re-implementation.

Each step, the noisy latents are filtered by a spectral prior (SEA) into an indicator; while the
accumulated relative change of the indicator stays below a threshold, the block stack is skipped
and its residual predicted from the last full steps. diffusers needs the pipeline to pass the
step, sigma and step count through ``cache_context`` and a model adapter that finds the latents:
it ships both for Wan text-to-video and Cosmos 3 only (elsewhere it silently runs in full).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vdtome.core.denoisers import DenoiserType
from vdtome.methods.base import REUSES_BLOCKS
from vdtome.methods.diffusers_cache import block_cache_unavailable, cache_method, first_refusal
from vdtome.methods.schema import check_settings, config_values, form_fields, setting

NAME = "sea_cache"
MAX_STEPS = 100
MAX_CONSECUTIVE = 10
# Denoiser classes with a diffusers adapter and a pipeline that passes the scheduler's step and sigma.
ADAPTED = ("WanTransformer3DModel", "Cosmos3OmniTransformer")


@dataclass(frozen=True)
class SeaCache:
    """``threshold``: accumulated relative change of the indicator below which the blocks are
    skipped; ``residual_order``: 0 reuses the last residual, 1 extrapolates from the last two;
    ``retention_steps`` / ``cache_end_steps``: first / last steps always computed;
    ``max_consecutive_cached``: most skips in a row (0: no limit); ``power_exp``: exponent of the
    spectral prior (3 for video). Defaults are diffusers'."""

    threshold: float = setting(0.25, "Change threshold", "skip the blocks while the filtered latents' accumulated "
                               "relative change stays below this (0: never skip)", 0.0, 2.0, 0.01, sweepable=True)
    residual_order: int = setting(1, "Residual order", "0 reuses the last residual, 1 extrapolates from the last two",
                                  0, 1, 1)
    max_consecutive_cached: int = setting(2, "Most steps skipped in a row", "0: no limit", 0, MAX_CONSECUTIVE, 1,
                                          name="max_consecutive")
    retention_steps: int = setting(1, "First steps always computed", "", 0, MAX_STEPS, 1, advanced=True,
                                   counts_steps=True)
    cache_end_steps: int = setting(1, "Last steps always computed", "", 0, MAX_STEPS, 1, advanced=True,
                                   name="end_steps", counts_steps=True)
    power_exp: float = setting(3.0, "Spectral prior exponent", "3 for video features", 0.5, 6.0, 0.5, advanced=True)

    def __post_init__(self) -> None:
        check_settings(self, NAME)


FIELDS = form_fields(SeaCache, NAME)


def parse(values: Mapping[str, Any]) -> SeaCache:
    return SeaCache(**config_values(SeaCache, NAME, values))


def summary(config: SeaCache) -> str:
    return f"threshold {config.threshold:g} order {config.residual_order}"


def build(config: SeaCache, pipe: Any, model: Any) -> Any:
    from diffusers.hooks import SeaCacheConfig

    if type(model).__name__ == "WanTransformer3DModel" and model.config.in_channels != model.config.out_channels:
        raise ValueError("vdtome: sea_cache: diffusers' SeaCache adapter serves Wan text-to-video only (this Wan "
                         "takes conditioning channels)")
    return SeaCacheConfig(threshold=config.threshold, residual_order=config.residual_order,
                          retention_steps=config.retention_steps, cache_end_steps=config.cache_end_steps,
                          max_consecutive_cached=config.max_consecutive_cached, power_exp=config.power_exp)


def _refuses(denoiser: DenoiserType) -> str | None:
    if denoiser.name in ADAPTED:
        return None
    return (f"diffusers' SeaCache has no adapter for {denoiser.name}: it needs the model's noisy latents "
            "and the scheduler's step and sigma from the pipeline, which diffusers provides for Wan "
            "text-to-video and Cosmos 3 only")


def unavailable(denoiser_types: tuple[DenoiserType, ...]) -> str | None:
    return first_refusal(denoiser_types, block_cache_unavailable, _refuses)


METHOD = cache_method(
    NAME, "SeaCache", SeaCache, FIELDS, parse, summary, build,
    reuses=REUSES_BLOCKS,
    unavailable=unavailable,
    graph_breaks="diffusers' SeaCache leader hook runs eagerly (torch.compiler.disable) and its filter returns"
                 " non-tensors",
    docs="skips the blocks while spectrally filtered latents barely change between steps, predicting their "
         "residual (diffusers SeaCacheConfig)",
)
