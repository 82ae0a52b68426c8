"""Pyramid Attention Broadcast as a plug-in: diffusers' ``PyramidAttentionBroadcastConfig`` hook.

Within a timestep range, an attention module computes only every N-th call and returns its stored
output in between; N is set per kind of attention (spatial self-, temporal self-, cross-attention).
diffusers keeps one store per attention module, not one per CFG branch: in a pipeline that calls
the denoiser once per branch (Wan) the unconditional call would take the conditional call's output
of the same step, which is not a reuse across steps at all: such models are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vdtome.core.denoisers import DenoiserType
from vdtome.methods.base import REUSES_ATTENTION
from vdtome.methods.diffusers_cache import cache_method, cache_unavailable, first_refusal, host_timestep
from vdtome.methods.schema import Part, check_increasing, check_settings, config_values, form_fields, setting

NAME = "pyramid_attention_broadcast"
# Denoisers whose pipelines call them once per CFG branch, with diffusers' one store per module.
PER_BRANCH_CALLS = {"WanTransformer3DModel": "Wan"}
MAX_SKIP = 10
KINDS = ("spatial", "temporal", "cross")


def _skip(kind: str, default: int, sweepable: bool = False) -> Any:
    return setting(default, f"{kind.capitalize()} attention: compute every N calls",
                   f"{kind} attention reuses its output for N - 1 calls in between (1: never reuses)", 1, MAX_SKIP, 1,
                   sweepable=sweepable, name=f"{kind}_skip")


@dataclass(frozen=True)
class PyramidAttentionBroadcast:
    """``*_skip_range``: an attention of that kind computes every N-th call and reuses its output
    in between (1: always computes); ``timestep_range``: reuse only at timesteps strictly between
    these bounds (diffusers' defaults: 100, 800)."""

    spatial_skip_range: int = _skip("spatial", 2, sweepable=True)
    temporal_skip_range: int = _skip("temporal", 1)
    cross_skip_range: int = _skip("cross", 1)
    timestep_range: tuple[int, int] = setting(
        (100, 800), "Reuse between timesteps", "", 0, 1000, 1, advanced=True, name="timestep",
        parts=(Part("from", "Reuse above timestep", "outputs are reused only at timesteps strictly between the two "
                    "bounds"), Part("to", "Reuse below timestep")))

    def __post_init__(self) -> None:
        check_settings(self, NAME)
        check_increasing(self, NAME, "timestep_range", "reuse")


FIELDS = form_fields(PyramidAttentionBroadcast, NAME)


def parse(values: Mapping[str, Any]) -> PyramidAttentionBroadcast:
    return PyramidAttentionBroadcast(**config_values(PyramidAttentionBroadcast, NAME, values))


def summary(config: PyramidAttentionBroadcast) -> str:
    ranges = " ".join(f"{kind} {getattr(config, f'{kind}_skip_range')}" for kind in KINDS
                      if getattr(config, f"{kind}_skip_range") > 1)
    low, high = config.timestep_range
    return f"{ranges or 'no reuse'} t {low}-{high}"


def build(config: PyramidAttentionBroadcast, pipe: Any, model: Any) -> Any:
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    # A kind at 1 would store outputs it never reuses: it is left unhooked. With every kind at 1,
    # spatial is hooked at 1 all the same: diffusers turns "no kind set" into spatial 2.
    ranges = {kind: getattr(config, f"{kind}_skip_range") for kind in KINDS}
    hooked = {kind: value if value > 1 else None for kind, value in ranges.items()}
    if not any(hooked.values()):
        hooked["spatial"] = 1
    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=hooked["spatial"],
        temporal_attention_block_skip_range=hooked["temporal"],
        cross_attention_block_skip_range=hooked["cross"],
        spatial_attention_timestep_skip_range=config.timestep_range,
        temporal_attention_timestep_skip_range=config.timestep_range,
        cross_attention_timestep_skip_range=config.timestep_range,
        current_timestep_callback=host_timestep(pipe),
    )


def _refuses(denoiser: DenoiserType) -> str | None:
    family = PER_BRANCH_CALLS.get(denoiser.name)
    if family is None:
        return None
    return (f"{family} pipelines call the denoiser once per CFG branch and diffusers' pyramid attention broadcast "
            "keeps one store per attention module, not per branch: the unconditional call would reuse the "
            "conditional call's output of the same step")


def unavailable(denoiser_types: tuple[DenoiserType, ...]) -> str | None:
    return first_refusal(denoiser_types, cache_unavailable, _refuses)


METHOD = cache_method(
    NAME, "pyramid attention broadcast", PyramidAttentionBroadcast, FIELDS, parse, summary, build,
    reuses=REUSES_ATTENTION,
    unavailable=unavailable,
    docs="reuses each attention module's output for N - 1 calls within a timestep range, N per kind of "
         "attention (diffusers PyramidAttentionBroadcastConfig)",
)
