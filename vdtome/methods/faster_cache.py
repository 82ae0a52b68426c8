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

from vdtome.core.denoisers import DenoiserType
from vdtome.methods.base import REUSES_ATTENTION
from vdtome.methods.diffusers_cache import cache_method, cache_unavailable, first_refusal, host_timestep
from vdtome.methods.schema import Part, check_increasing, check_settings, config_values, form_fields, setting

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


def _timesteps(what: str, default: tuple[int, int], label: str) -> Any:
    return setting(default, label, "", -1, 1000, 1, advanced=True, name=what, parts=(
        Part("from", f"{label} above timestep", "reuse only at timesteps strictly between the bounds (-1 includes "
             "timestep 0)"), Part("to", f"{label} below timestep")))


@dataclass(frozen=True)
class FasterCache:
    """``spatial_skip_range``: self-attention computes every N-th call and is extrapolated in
    between, at timesteps strictly inside ``spatial_timestep_range``; ``uncond_skip_range``: the
    unconditional branch is computed every M-th step and approximated in between, inside
    ``uncond_timestep_range``; ``attention_weight``: the extrapolation's weight on the last change;
    ``alpha_low_frequency`` / ``alpha_high_frequency``: scales of the stored branch difference
    (1: unscaled). Defaults are diffusers'."""

    spatial_skip_range: int = setting(2, "Self-attention: compute every N calls", "in between, its output is "
                                      "extrapolated from the last two computed (1: always computes)", 1, MAX_SKIP, 1,
                                      sweepable=True, name="spatial_skip")
    uncond_skip_range: int = setting(5, "Unconditional branch: compute every M steps", "in between, it is approximated "
                                     "from the conditional branch (1: always computes)", 1, MAX_SKIP, 1,
                                     name="uncond_skip")
    attention_weight: float = setting(0.5, "Extrapolation weight", "weight of the last change when self-attention is "
                                      "extrapolated", 0.0, 1.0, 0.05, advanced=True)
    alpha_low_frequency: float = setting(1.1, "Low-frequency scale", "scale of the stored low-frequency branch "
                                         "difference", 0.5, 2.0, 0.05, advanced=True, name="alpha_low")
    alpha_high_frequency: float = setting(1.1, "High-frequency scale", "scale of the stored high-frequency branch "
                                          "difference", 0.5, 2.0, 0.05, advanced=True, name="alpha_high")
    spatial_timestep_range: tuple[int, int] = _timesteps("spatial", (-1, 681), "Self-attention reuse")
    uncond_timestep_range: tuple[int, int] = _timesteps("uncond", (-1, 641), "Unconditional reuse")

    def __post_init__(self) -> None:
        check_settings(self, NAME)
        check_increasing(self, NAME, "spatial_timestep_range", "spatial reuse")
        check_increasing(self, NAME, "uncond_timestep_range", "uncond reuse")


FIELDS = form_fields(FasterCache, NAME)


def parse(values: Mapping[str, Any]) -> FasterCache:
    return FasterCache(**config_values(FasterCache, NAME, values))


def summary(config: FasterCache) -> str:
    return f"attention every {config.spatial_skip_range} uncond every {config.uncond_skip_range}"


def build(config: FasterCache, pipe: Any, model: Any) -> Any:
    from diffusers.hooks import FasterCacheConfig

    reason = unavailable((DenoiserType.of(type(model)),))
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


def _refuses(denoiser: DenoiserType) -> str | None:
    if denoiser.name in TENSOR_FORMATS:
        return None
    why = WHY_NOT.get(denoiser.name, "it needs both CFG branches in one batch and a (B, C, F, H, W) or "
                                     "(B, F, C, H, W) output, not checked for this model")
    return f"diffusers' FasterCache cannot serve {denoiser.name}: {why}"


def unavailable(denoiser_types: tuple[DenoiserType, ...]) -> str | None:
    return first_refusal(denoiser_types, cache_unavailable, _refuses)


METHOD = cache_method(
    NAME, "FasterCache", FasterCache, FIELDS, parse, summary, build,
    reuses=REUSES_ATTENTION,
    unavailable=unavailable,
    needs_guidance=True,
    graph_breaks="diffusers' FasterCache calls logging.Logger methods inside its hooks",
    docs="extrapolates self-attention outputs between computed steps and approximates the unconditional CFG "
         "branch from the conditional one (diffusers FasterCacheConfig)",
)
