"""Token merging (ToMe) as a plug-in: its form, its config and its report (the hooks live in
:mod:`vdtome.tome`, imported when it is applied). Form names are those the app's API has always
taken (``ratio``, ``stride_t``...)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from vdtome.core.validation import RequestError
from vdtome.core.denoisers import DenoiserType
from vdtome.methods.base import Deferred, Evidence, FormField, Method, MethodReport, Search
from vdtome.methods.schedules import read_schedule, shipped_schedules
from vdtome.tome.adapters import SUPPORTED_MODELS
from vdtome.tome.config import ToMeConfig

RATIO_STEP = 0.05
MAX_STRIDE = 9  # the video ToMe study's widest cell is 4x6x9
MAX_REUSE_STEPS = 10
MAX_STEPS = 100  # the whole first steps' bound (a request's steps count is its own limit)
# Labels of the target checkboxes and the config field each one sets.
TARGETS = {"self-attention": "merge_self_attn", "cross-attention queries": "merge_cross_attn",
           "feed-forward": "merge_ffn"}
BLOCK_CHOICES = {"all blocks": "all", "every other block": "every_other"}
# Below this many video tokens per block, attention is a small share of a forward and the cost of
# matching can outweigh what merging saves (see benchmarks/tome_speed.py for where it pays off).
FEW_TOKENS = 1024


def stride_ratio_cap(stride: tuple[int, int, int]) -> float:
    """Largest ratio a stride allows, rounded down to the slider step: 1 - 1 / (st * sy * sx).

    Only non-destination tokens can merge; one token per cell is the destination.
    """
    cells = math.prod(stride)
    # Rounded to the step's digits: 19 * 0.05 is 0.9500000000000001, not what anyone would type.
    return round(math.floor((1.0 - 1.0 / cells) / RATIO_STEP + 1e-9) * RATIO_STEP, 2)


def _ratio_bound(values: Mapping[str, Any]) -> tuple[float, str]:
    stride = (values["stride_t"], values["stride_y"], values["stride_x"])
    return stride_ratio_cap(stride), f"at most {stride_ratio_cap(stride):.2f} for stride {'x'.join(map(str, stride))}"


def _stride_field(axis: str, default: int) -> FormField:
    return FormField(f"stride_{axis}", "integer", default, f"Stride {axis}", f"cell size along {axis}",
                     1, MAX_STRIDE, 1)


FIELDS = (
    FormField("ratio", "number", 0.5, "Merge ratio",
              "share of video tokens merged before each patched sub-layer; at most 1 - 1/(st*sy*sx) "
              "(0.75 for stride 1x2x2)", 0.0, stride_ratio_cap((MAX_STRIDE,) * 3), RATIO_STEP, sweepable=True,
              sweep_example="0.1, 0.3, 0.5, 0.7", bound=_ratio_bound, bound_by=("stride_t", "stride_y", "stride_x")),
    _stride_field("t", 1),
    _stride_field("y", 2),
    _stride_field("x", 2),
    FormField("strategy", "choice", "bipartite", "Strategy",
              "bipartite: destinations spread over space-time cells; attnbin: chosen in token-norm order",
              options=("bipartite", "attnbin")),
    FormField("blocks", "choice", "all blocks", "Blocks", options=tuple(BLOCK_CHOICES)),
    FormField("targets", "choices", ("self-attention",), "Merge targets",
              "sub-layers that run on merged tokens; text tokens are never merged",
              options=tuple(TARGETS)),
    FormField("reuse_steps", "integer", 1, "Reuse a matching for k steps", "", 1, MAX_REUSE_STEPS, 1,
              sweepable=True),
    FormField("whole_steps", "integer", 0, "Whole first steps",
              "the first k denoising steps run on every token (layout and motion form there); merging starts after",
              0, MAX_STEPS, 1, counts_steps=True),
    FormField("matching", "choice", "shared", "Matching across the CFG batch", options=("shared", "per_sample"),
              advanced=True),
    FormField("random_destinations", "boolean", True, "Random destinations", "one per cell, seeded; off: each cell's first token",
              advanced=True),
    FormField("local_window", "boolean", True, "Local matching window", "linear cost; off: global matching as ToMe",
              advanced=True),
    FormField("ratio_schedule", "text", "", "Ratio per block (schedule)",
              "a shipped schedule's name or a JSON file from `python -m vdtome search --method tome`: each block's "
              "own ratio in place of the merge ratio; empty: the merge ratio everywhere",
              options=shipped_schedules("tome"), advanced=True),
)


def parse(values: Mapping[str, Any]) -> ToMeConfig:
    """Cross-field rules on checked values: the ratio within the stride's cap, a target chosen."""
    stride = (values["stride_t"], values["stride_y"], values["stride_x"])
    cap = stride_ratio_cap(stride)
    if cap <= 0:
        raise RequestError(f"stride {stride} makes every token a destination: nothing can merge", "stride_x")
    if values["ratio"] > cap + 1e-9:
        raise RequestError(
            f"merge ratio must be between 0 and {cap:.2f} for stride {stride} (one token in every "
            f"{math.prod(stride)} is a destination and cannot merge), got {values['ratio']:g}", "ratio")
    targets = values["targets"]
    if not targets:
        raise RequestError(f"choose at least one merge target ({', '.join(TARGETS)})", "targets")
    block_ratios = schedule_ratios(values.get("ratio_schedule", ""), stride) if values.get("ratio_schedule") else ()
    if block_ratios and values["blocks"] != "all blocks":
        raise RequestError("a ratio schedule sets every block's ratio (0: left alone): set blocks to all blocks",
                           "blocks")
    return ToMeConfig(
        block_ratios=block_ratios,
        ratio=values["ratio"],
        stride=stride,
        strategy=values["strategy"],
        blocks=BLOCK_CHOICES[values["blocks"]],
        reuse_steps=values["reuse_steps"],
        whole_steps=values["whole_steps"],
        matching=values["matching"],
        random_destinations=values["random_destinations"],
        match_window="auto" if values["local_window"] else None,
        **{field: label in targets for label, field in TARGETS.items()},
    )


def schedule_ratios(text: str, stride: tuple[int, int, int]) -> tuple[float, ...]:
    """The per-block ratios of a schedule, searched at ``stride`` (a ratio means another merge at
    another stride, so a schedule for one stride is refused at another)."""
    data = read_schedule(text, "tome", "ratio_schedule", "ratios")
    if tuple(data.get("stride", ())) != stride:
        raise RequestError(f"schedule {text!r} was searched at stride {'x'.join(map(str, data.get('stride', ())))}; "
                           f"set the strides to it (now {'x'.join(map(str, stride))})", "ratio_schedule")
    ratios = data["ratios"]
    cap = stride_ratio_cap(stride)
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r <= cap + 1e-9 for r in ratios):
        raise RequestError(f"schedule {text!r}: every block's ratio must be a number in [0, {cap:.2f}]",
                           "ratio_schedule")
    return tuple(float(r) for r in ratios)


def summary(config: ToMeConfig) -> str:
    ratio = (f"ratio per block (mean {config.requested_ratio:.2f} where merging)" if config.block_ratios
             else f"ratio {config.ratio:g}")
    parts = [ratio, "stride " + "x".join(map(str, config.stride))]
    if config.strategy != "bipartite":
        parts.append(config.strategy)
    if config.blocks != "all":
        parts.append(f"blocks {config.blocks}")
    if config.reuse_steps > 1:
        parts.append(f"reuse {config.reuse_steps}")
    if config.whole_steps:
        parts.append(f"from step {config.whole_steps}")
    return " ".join(parts)


class AppliedToMe:
    def __init__(self, pipe, config: ToMeConfig) -> None:
        from vdtome.tome.apply import ScheduleMismatch, apply_tome

        self.config = config
        try:
            self.handle = apply_tome(pipe, config)
        except ScheduleMismatch as error:
            raise RequestError(str(error), "ratio_schedule") from None

    def reset(self) -> None:
        self.handle.reset()

    def remove(self) -> None:
        self.handle.remove()

    def report(self) -> MethodReport:
        stats = self.handle.stats()
        total_in = sum(site.total_in for site in stats.sites)
        merged = total_in - sum(site.total_out for site in stats.sites)
        tokens = max((site.tokens_in for site in stats.sites), default=0)
        notes = []
        if stats.effective_ratio < stats.requested_ratio - 0.02:
            notes.append(f"effective merge ratio {stats.effective_ratio:.2f} is below the requested "
                         f"{stats.requested_ratio:.2f}: with stride {self.config.stride} only tokens that are not a "
                         "cell's destination can merge")
        if 0 < tokens < FEW_TOKENS:
            notes.append(f"only {tokens} video tokens per block: attention is a small part of this model's work, so "
                         "merging can cost more than it saves; speedups show on real models at real sizes "
                         "(thousands of tokens)")
        return MethodReport(
            method="tome",
            summary={"settings": summary(self.config), "effective ratio": round(stats.effective_ratio, 3)},
            rows=(("merge ratio (requested / effective)",
                   f"{stats.requested_ratio:.2f} / {stats.effective_ratio:.2f}",
                   f"{stats.blocks_patched}/{stats.blocks_total} blocks"),),
            notes=tuple(notes),
            detail={
                "requested_ratio": stats.requested_ratio,
                "effective_ratio": stats.effective_ratio,
                "blocks_patched": stats.blocks_patched,
                "blocks_total": stats.blocks_total,
                "tokens_per_block": [
                    {"block": s.block, "target": s.target, "module": s.module, "calls": s.calls,
                     "tokens_in": s.tokens_in, "tokens_out": s.tokens_out} for s in stats.sites
                ],
            },
            evidence=(Evidence("video tokens merged away (over all patched sub-layer calls)", merged, total_in),),
        )


def _unavailable(denoiser_types: tuple[DenoiserType, ...]) -> str | None:
    if any(denoiser.name in SUPPORTED_MODELS for denoiser in denoiser_types):
        return None
    names = ", ".join(denoiser.name for denoiser in denoiser_types)
    return f"token merging does not support {names}; supported models: {', '.join(SUPPORTED_MODELS)}"


METHOD = Method(
    name="tome",
    label="token merging (ToMe)",
    config_type=ToMeConfig,
    apply=AppliedToMe,
    fields=FIELDS,
    parse=parse,
    summary=summary,
    unavailable=_unavailable,
    on_by_default=True,
    # With reuse_steps > 1 some steps compute a matching and others reuse it; whole first steps
    # cost more than merged ones: steps differ.
    steps_alike=lambda config: config.reuse_steps == 1 and config.whole_steps == 0,
    matching_varies=lambda config: config.merges,
    alters_block=lambda config, block: config.selects_block(block) and config.ratio_of(block) > 0,
    search=Search("ratio_schedule", "ratios", Deferred("vdtome.tome.search", "RatioSearch")),
    graph_breaks="its token matching runs eagerly (torch.compiler.disable: it keeps Python state across steps), "
                 "one break per merging sub-layer",
    docs="merges similar video tokens before chosen sub-layers and restores them after (vdtome.tome)",
)
