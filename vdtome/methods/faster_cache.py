"""FasterCache as a plug-in: diffusers' ``FasterCacheConfig`` hooks, not a re-implementation.

Two reuses: self-attention outputs are extrapolated from the last two computed ones for N - 1
calls out of N, and the unconditional CFG branch is dropped from the batch for M - 1 steps out of
M, approximated from the conditional one plus a stored frequency-domain difference.

diffusers' FasterCache splits the unconditional and conditional branches out of one batch and the
output into frames: it serves models whose pipeline batches both CFG branches and whose output is
(B, C, F, H, W) or (B, F, C, H, W). The models vdtome checked are listed in ``TENSOR_FORMATS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vdtome.core.validation import RequestError
from vdtome.methods.base import REUSES_ATTENTION, FormField, check_whole_number
from vdtome.methods.diffusers_cache import cache_method, cache_unavailable, first_refusal, host_timestep

NAME = "faster_cache"
MAX_SKIP = 10
# Denoiser class -> layout of its output, as diffusers' FasterCache names it.
TENSOR_FORMATS = {"CogVideoXTransformer3DModel": "BFCHW"}
WHY_NOT = {
    "WanTransformer3DModel": "Wan pipelines call the denoiser once per CFG branch, while FasterCache needs both "
                             "branches in one batch",
    "LTXVideoTransformer3DModel": "LTX-Video returns packed tokens (batch, tokens, channels), which FasterCache "
                                  "cannot split into frames",
    "HunyuanVideoTransformer3DModel": "HunyuanVideo is guidance-distilled (no unconditional branch to skip)",
}


def _check_range(what: str, value: tuple[int, int]) -> None:
    low, high = value
    if not -1 <= low < high <= 1000:
        raise ValueError(f"{what} timestep range must satisfy -1 <= from < to <= 1000, got {value}")


@dataclass(frozen=True)
class FasterCache:
    """``spatial_skip_range``: self-attention computes every N-th call and is extrapolated in
    between, at timesteps strictly inside ``spatial_timestep_range``; ``uncond_skip_range``: the
    unconditional branch is computed every M-th step and approximated in between, inside
    ``uncond_timestep_range``; ``attention_weight``: the extrapolation's weight on the last change;
    ``alpha_low_frequency`` / ``alpha_high_frequency``: scales of the stored branch difference
    (1: unscaled). Defaults are diffusers'."""

    spatial_skip_range: int = 2
    spatial_timestep_range: tuple[int, int] = (-1, 681)
    uncond_skip_range: int = 5
    uncond_timestep_range: tuple[int, int] = (-1, 641)
    attention_weight: float = 0.5
    alpha_low_frequency: float = 1.1
    alpha_high_frequency: float = 1.1

    def __post_init__(self) -> None:
        for what in ("spatial_skip_range", "uncond_skip_range"):
            check_whole_number(what, getattr(self, what), 1, MAX_SKIP)
        _check_range("spatial attention", self.spatial_timestep_range)
        _check_range("unconditional branch", self.uncond_timestep_range)
        if not 0.0 <= self.attention_weight <= 1.0:
            raise ValueError(f"attention weight must be between 0 and 1, got {self.attention_weight}")
        for what in ("alpha_low_frequency", "alpha_high_frequency"):
            if not 0.5 <= getattr(self, what) <= 2.0:
                raise ValueError(f"{what} must be between 0.5 and 2, got {getattr(self, what)}")


def _timestep_field(what: str, bound: str, default: int, label: str) -> FormField:
    return FormField(f"{NAME}_{what}_{bound}", "integer", default, label,
                     "reuse only at timesteps strictly between the bounds (-1 includes timestep 0)",
                     -1, 1000, 1, advanced=True)


FIELDS = (
    FormField(f"{NAME}_spatial_skip", "integer", 2, "Self-attention: compute every N calls",
              "in between, its output is extrapolated from the last two computed (1: always computes)",
              1, MAX_SKIP, 1, sweepable=True),
    FormField(f"{NAME}_uncond_skip", "integer", 5, "Unconditional branch: compute every M steps",
              "in between, it is approximated from the conditional branch (1: always computes)", 1, MAX_SKIP, 1),
    FormField(f"{NAME}_attention_weight", "number", 0.5, "Extrapolation weight",
              "weight of the last change when self-attention is extrapolated", 0.0, 1.0, 0.05, advanced=True),
    FormField(f"{NAME}_alpha_low", "number", 1.1, "Low-frequency scale",
              "scale of the stored low-frequency branch difference", 0.5, 2.0, 0.05, advanced=True),
    FormField(f"{NAME}_alpha_high", "number", 1.1, "High-frequency scale",
              "scale of the stored high-frequency branch difference", 0.5, 2.0, 0.05, advanced=True),
    _timestep_field("spatial", "from", -1, "Self-attention reuse above timestep"),
    _timestep_field("spatial", "to", 681, "Self-attention reuse below timestep"),
    _timestep_field("uncond", "from", -1, "Unconditional reuse above timestep"),
    _timestep_field("uncond", "to", 641, "Unconditional reuse below timestep"),
)


def parse(values: Mapping[str, Any]) -> FasterCache:
    ranges = {}
    for what in ("spatial", "uncond"):
        low, high = values[f"{NAME}_{what}_from"], values[f"{NAME}_{what}_to"]
        if low >= high:
            raise RequestError(f"the {what} reuse timestep range is empty: {low} to {high}", f"{NAME}_{what}_to")
        ranges[what] = (low, high)
    return FasterCache(
        spatial_skip_range=values[f"{NAME}_spatial_skip"],
        spatial_timestep_range=ranges["spatial"],
        uncond_skip_range=values[f"{NAME}_uncond_skip"],
        uncond_timestep_range=ranges["uncond"],
        attention_weight=values[f"{NAME}_attention_weight"],
        alpha_low_frequency=values[f"{NAME}_alpha_low"],
        alpha_high_frequency=values[f"{NAME}_alpha_high"],
    )


def summary(config: FasterCache) -> str:
    return f"attention every {config.spatial_skip_range} uncond every {config.uncond_skip_range}"


def build(config: FasterCache, pipe: Any, model: Any) -> Any:
    from diffusers.hooks import FasterCacheConfig

    reason = unavailable((type(model),))
    if reason:
        raise ValueError(f"vdtome: {NAME}: {reason}")
    return FasterCacheConfig(
        spatial_attention_block_skip_range=config.spatial_skip_range,
        spatial_attention_timestep_skip_range=config.spatial_timestep_range,
        unconditional_batch_skip_range=config.uncond_skip_range,
        unconditional_batch_timestep_skip_range=config.uncond_timestep_range,
        attention_weight_callback=lambda module: config.attention_weight,
        alpha_low_frequency=config.alpha_low_frequency,
        alpha_high_frequency=config.alpha_high_frequency,
        tensor_format=TENSOR_FORMATS[type(model).__name__],
        current_timestep_callback=host_timestep(pipe),
    )


def _refuses(cls: type) -> str | None:
    if cls.__name__ in TENSOR_FORMATS:
        return None
    why = WHY_NOT.get(cls.__name__, "it needs both CFG branches in one batch and a (B, C, F, H, W) or "
                                    "(B, F, C, H, W) output, not checked for this model")
    return f"diffusers' FasterCache cannot serve {cls.__name__}: {why}"


def unavailable(denoiser_types: tuple[type, ...]) -> str | None:
    return first_refusal(denoiser_types, cache_unavailable, _refuses)


METHOD = cache_method(
    NAME, "FasterCache", FasterCache, FIELDS, parse, summary, build,
    reuses=REUSES_ATTENTION,
    unavailable=unavailable,
    needs_guidance=True,
    docs="extrapolates self-attention outputs between computed steps and approximates the unconditional CFG "
         "branch from the conditional one (diffusers FasterCacheConfig)",
)
