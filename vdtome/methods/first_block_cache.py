"""First Block Cache as a plug-in: diffusers' ``FirstBlockCacheConfig`` hook, not a re-implementation.

Each denoiser call runs its first transformer block; when that block's residual changed by less
than ``threshold`` (relative mean absolute difference) since the last full call, the remaining
blocks are skipped and their cached residual is added instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vdtome.methods.base import REUSES_BLOCKS
from vdtome.methods.diffusers_cache import block_cache_unavailable, cache_method
from vdtome.methods.schema import check_settings, config_values, form_fields, setting

NAME = "first_block_cache"


@dataclass(frozen=True)
class FirstBlockCache:
    """``threshold``: the first block's relative residual change below which the other blocks are
    skipped (0 never skips; larger skips more)."""

    threshold: float = setting(0.05, "Residual threshold", "skip the other blocks while the first block's residual "
                               "changes less than this (0: never skip)", 0.0, 1.0, 0.01, sweepable=True)

    def __post_init__(self) -> None:
        check_settings(self, NAME)


FIELDS = form_fields(FirstBlockCache, NAME)


def parse(values: Mapping[str, Any]) -> FirstBlockCache:
    return FirstBlockCache(**config_values(FirstBlockCache, NAME, values))


def summary(config: FirstBlockCache) -> str:
    return f"threshold {config.threshold:g}"


def build(config: FirstBlockCache, pipe: Any, model: Any) -> Any:
    from diffusers.hooks import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=config.threshold)


METHOD = cache_method(
    NAME, "first block cache", FirstBlockCache, FIELDS, parse, summary, build,
    reuses=REUSES_BLOCKS,
    unavailable=block_cache_unavailable,
    graph_breaks="diffusers decides whether to run the remaining blocks in an eager function "
                 "(torch.compiler.disable): a break at every denoiser call",
    docs="skips all blocks after the first while the first block's residual barely changes between steps "
         "(diffusers FirstBlockCacheConfig)",
)
