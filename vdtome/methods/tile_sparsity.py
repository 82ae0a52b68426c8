"""Attention-tile sparsity (Efficient-vDiT, training-free part) as a plug-in: each block's 3D
self-attention attends, for every latent frame, its own frame and ``G`` global frames only.

The pattern's math lives in :mod:`vdtome.core.tile_sparsity`. In
:mod:`vdtome.methods.tile_sparsity_hooks` a ``ModelHook`` on each block's
self-attention module runs the module under a ``TorchFunctionMode`` that catches its
``scaled_dot_product_attention`` call: the processor has already applied its rotary embedding and
joined text and video (text first for CogVideoX and LTX's conditioning tokens, after the video for
HunyuanVideo and Mochi, none for Wan), so the keys are selected from what the kernel would get.
Where the video sits and each token's frame come from the token grid the model's adapter reads at
every denoiser call; under token merging, from the matching the merged sub-layer runs on (a kept
token carries its destination's frame). Calls that are not self-attention over that layout
(cross-attention, causal or dropout calls) run untouched.

``dense`` is the identity (the calls pass through: bitwise the unpatched model). A schedule gives
each layer its own pattern (``python -m vdtome search --method tile_sparsity``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vdtome.core.denoisers import DenoiserType
from vdtome.core.tile_sparsity import PLACEMENTS, TilePattern, parse_pattern
from vdtome.core.validation import RequestError
from vdtome.methods.base import Deferred, Method, Search
from vdtome.methods.schedules import read_schedule, shipped_schedules
from vdtome.methods.schema import check_settings, config_values, form_fields, setting
from vdtome.tome.adapters import ADAPTERS

NAME = "tile_sparsity"
KERNELS = ("auto", "gather", "flex")
MODELS = tuple(name for adapter in ADAPTERS if adapter.frames_attended for name in adapter.model_classes)


@dataclass(frozen=True)
class TileSparsity:
    """``pattern``: ``dense`` or ``G:P`` (G + P = the latent frame count of the request);
    ``placement``: global frames first or evenly spaced; ``dense_steps``: the first steps stay
    dense; ``schedule``: per-layer patterns in place of ``pattern`` (``layer_patterns``, read from
    the file when the config is made, unless given); ``kernel``: gathered keys, FlexAttention's block mask, or
    auto (FlexAttention compiled on CUDA, gathered keys elsewhere)."""

    pattern: str = setting("dense", "Tile pattern", "dense, or G:P: each latent frame attends its own frame and G "
                           "global frames, P pruned, G + P = the latent frame count (e.g. 1:7 at 8 latent frames)",
                           options=("dense",), free_text=True)
    placement: str = setting("first", "Global frames", "the first G latent frames, or G spread evenly from the "
                             "first to the last", options=PLACEMENTS)
    dense_steps: int = setting(0, "Dense first steps", "the first k denoising steps attend densely (the layout of a "
                               "video is set early)", 0, 100, 1, counts_steps=True)
    schedule: str = setting("", "Pattern per layer (schedule)", "a shipped schedule's name or a JSON file from "
                            "`python -m vdtome search --method tile_sparsity`: each layer's own pattern in place of "
                            "the tile pattern; empty: the tile pattern everywhere",
                            options=shipped_schedules(NAME), free_text=True)
    kernel: str = setting("auto", "Kernel", "gather: each query frame over its gathered keys; flex: FlexAttention "
                          "with a block mask (compiled on CUDA); auto: flex on CUDA, gather elsewhere",
                          options=KERNELS, advanced=True)
    layer_patterns: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        check_settings(self, NAME)
        if self.schedule and not self.layer_patterns:
            object.__setattr__(self, "layer_patterns", _scheduled_patterns(self))
        object.__setattr__(self, "layer_patterns", tuple(self.layer_patterns))
        for text in (self.pattern, *self.layer_patterns):
            try:
                parse_pattern(text)
            except ValueError as error:
                raise RequestError(str(error), f"{NAME}_{'pattern' if text == self.pattern else 'schedule'}") from None
        if self.layer_patterns and not self.schedule:
            raise RequestError("per-layer patterns come from a schedule: name it", f"{NAME}_schedule")

    def pattern_of(self, layer: int) -> TilePattern | None:
        return parse_pattern(self.layer_patterns[layer] if self.layer_patterns else self.pattern)

    @property
    def sparse(self) -> bool:
        return any(parse_pattern(text) is not None for text in (self.layer_patterns or (self.pattern,)))


FIELDS = form_fields(TileSparsity, NAME)


def _scheduled_patterns(config: TileSparsity) -> tuple[str, ...]:
    """The per-layer patterns of ``config.schedule``, which must have been searched with the same
    global frames and dense first steps (its patterns were measured so)."""
    data = read_schedule(config.schedule, NAME, f"{NAME}_schedule", "layers")
    for key, label in (("placement", "global frames"), ("dense_steps", "dense first steps")):
        if data.get(key, getattr(config, key)) != getattr(config, key):
            raise RequestError(f"schedule {config.schedule!r} was searched with {label} {data[key]}: set {label} to "
                               f"{data[key]} (now {getattr(config, key)})", f"{NAME}_{key}")
    return tuple(str(item) for item in data["layers"])


def parse(values: Mapping[str, Any]) -> TileSparsity:
    return TileSparsity(**config_values(TileSparsity, NAME, values))


def summary(config: TileSparsity) -> str:
    parts = [f"schedule {config.schedule}" if config.schedule else config.pattern]
    if config.sparse:
        parts.append(f"global {config.placement}")
        if config.dense_steps:
            parts.append(f"dense first {config.dense_steps}")
    return " ".join(parts)


def _unavailable(denoiser_types: tuple[DenoiserType, ...]) -> str | None:
    if any(denoiser.name in MODELS for denoiser in denoiser_types):
        return None
    names = ", ".join(denoiser.name for denoiser in denoiser_types)
    return f"tile sparsity needs 3D self-attention over every frame's tokens; {names} has none; supported models: " \
           f"{', '.join(MODELS)}"


METHOD = Method(
    name=NAME,
    label="attention-tile sparsity",
    config_type=TileSparsity,
    apply=Deferred("vdtome.methods.tile_sparsity_hooks", "AppliedTileSparsity"),
    fields=FIELDS,
    parse=parse,
    summary=summary,
    unavailable=_unavailable,
    steps_alike=lambda config: config.dense_steps == 0,
    search=Search(f"{NAME}_schedule", "layers", Deferred("vdtome.methods.tile_sparsity_hooks", "PatternSearch")),
    graph_breaks="its attention runs in a torch-function mode dynamo cannot trace through (super().unflatten()) "
                 "and its per-call layout comes from the tokens' frames in Python (torch.unique, .item()): breaks "
                 "around every sparse attention call",
    docs="each latent frame's queries attend their own frame and G global frames only (Efficient-vDiT's "
         "frame-tile pattern, training-free); per-layer patterns from `python -m vdtome search`",
)
