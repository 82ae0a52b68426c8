"""TaylorSeer as a plug-in: diffusers' ``TaylorSeerCacheConfig`` hook, not a re-implementation.

Every attention module of the transformer blocks computes in full on refresh steps and, in
between, forecasts its output with a Taylor series in the step index built from finite
differences of its past outputs (one series per CFG branch: the hook keys its state by the
pipeline's cache context). diffusers' default module patterns (``...attn``, fully matched) miss
the ``attn1`` / ``attn2`` of video models, so the attention modules are named here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vdtome.methods.base import REUSES_ATTENTION
from vdtome.methods.diffusers_cache import cache_method
from vdtome.methods.schema import check_settings, config_values, form_fields, setting

NAME = "taylorseer_cache"
MAX_INTERVAL = 10
MAX_ORDER = 3
MAX_WARMUP = 100
DTYPES = ("bfloat16", "float32")
# Full-match patterns of the attention modules inside the transformer blocks.
ATTENTION_MODULES = (r"(?:blocks|transformer_blocks|single_transformer_blocks|temporal_transformer_blocks)"
                     r"\.\d+\.attn\d*",)


@dataclass(frozen=True)
class TaylorSeerCache:
    """``cache_interval``: one full computation every N steps after the warm-up (1: always full);
    ``disable_cache_before_step``: steps computed in full first, to fit the series (at least 1);
    ``max_order``: the series' order (0 reuses the last output); ``factors_dtype``: the dtype its
    factors are stored in. Defaults are diffusers'."""

    cache_interval: int = setting(5, "Compute every N steps", "after the warm-up, attention computes once every N "
                                  "steps and is forecast in between (1: always)", 1, MAX_INTERVAL, 1, sweepable=True,
                                  name="interval")
    disable_cache_before_step: int = setting(3, "Full steps first", "steps computed in full before any forecast, to "
                                             "fit the series", 1, MAX_WARMUP, 1, name="warmup_steps",
                                             counts_steps=True)
    max_order: int = setting(1, "Taylor order", "0 reuses the last output; higher orders extrapolate", 0, MAX_ORDER, 1,
                             advanced=True, name="order")
    factors_dtype: str = setting("bfloat16", "Factor dtype", "dtype the series' factors are stored in", options=DTYPES,
                                 advanced=True, name="dtype")

    def __post_init__(self) -> None:
        check_settings(self, NAME)


FIELDS = form_fields(TaylorSeerCache, NAME)


def parse(values: Mapping[str, Any]) -> TaylorSeerCache:
    return TaylorSeerCache(**config_values(TaylorSeerCache, NAME, values))


def summary(config: TaylorSeerCache) -> str:
    return f"interval {config.cache_interval} order {config.max_order} from step {config.disable_cache_before_step}"


def build(config: TaylorSeerCache, pipe: Any, model: Any) -> Any:
    import torch
    from diffusers.hooks import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(
        cache_interval=config.cache_interval,
        disable_cache_before_step=config.disable_cache_before_step,
        max_order=config.max_order,
        taylor_factors_dtype=getattr(torch, config.factors_dtype),
        cache_identifiers=list(ATTENTION_MODULES),
    )


METHOD = cache_method(
    NAME, "TaylorSeer", TaylorSeerCache, FIELDS, parse, summary, build,
    reuses=REUSES_ATTENTION,
    graph_breaks="diffusers measures and forecasts in eager functions (torch.compiler.disable): breaks at its "
                 "attention calls",
    docs="forecasts attention outputs between full steps with a Taylor series over past steps "
         "(diffusers TaylorSeerCacheConfig)",
)
