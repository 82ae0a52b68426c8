"""Configuration of token merging, validated on construction so bad settings fail early."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vdtome.tome.merge import DEFAULT_MAX_SCORE_ELEMENTS

Strategy = Literal["bipartite", "attnbin"]
Matching = Literal["shared", "per_sample"]
BlockSelection = Literal["all", "every_other"]

# Local matching window (in cells) used when ``match_window="auto"`` and the strategy is
# bipartite: with stride (1, 2, 2) a source meets the 32 destinations of 2 frames x 8 x 8 tokens.
DEFAULT_MATCH_WINDOW = (2, 4, 4)


@dataclass(frozen=True)
class ToMeConfig:
    """How to merge video tokens inside a video diffusion transformer.

    Attributes:
        ratio: share of the video tokens merged away before each patched sub-layer
            (ToMe for SD semantics: r = int(ratio * N), capped so that only sources merge, i.e. at
            most 1 - 1 / (st * sy * sx) for a grid divisible by the stride).
        stride: (st, sy, sx) cell size; one destination per cell.
        strategy: "bipartite" (destinations spread over space-time cells) or "attnbin"
            (destinations picked in bins of tokens sorted by L2 norm; matching is global).
        blocks: "all", "every_other" (0, 2, 4, ...) or explicit block indices.
        merge_self_attn / merge_cross_attn / merge_ffn: sub-layers that run on merged tokens.
            Cross-attention merges its queries only; text tokens are never merged.
        random_destinations: random destination per cell (else the cell's first token).
        seed: seeds ToMe's own generator; the draw depends on (seed, block, denoising step)
            only, so runs are reproducible and the diffusion noise RNG is never touched.
        matching: "shared" computes one matching for the whole batch (e.g. cond + uncond,
            ranked by mean similarity); "per_sample" matches every sample on its own (ToMe for
            SD). Models whose rotary tables broadcast over the batch need "shared".
        reuse_steps: recompute the matching every k denoising steps (1 = every call).
        match_window: cells (wt, wy, wx) of the local window in which a source looks for its
            destination (linear cost); None compares with every destination (quadratic, as
            ToMe). "auto" picks DEFAULT_MATCH_WINDOW for bipartite and None for attnbin.
        max_score_elements: size bound of one block of similarity scores (the bound is never
            below the metric's own size).
        block_ratios: one ratio per block (a schedule from ``python -m vdtome search``), in place
            of ``ratio``; a block at 0 is not patched. Empty: ``ratio`` in every selected block.
        whole_steps: the first denoising steps run on every token (layout and motion form there);
            merging starts at this step index.
    """

    ratio: float = 0.5
    stride: tuple[int, int, int] = (1, 2, 2)
    strategy: Strategy = "bipartite"
    blocks: BlockSelection | tuple[int, ...] = "all"
    merge_self_attn: bool = True
    merge_cross_attn: bool = False
    merge_ffn: bool = False
    random_destinations: bool = True
    seed: int = 0
    matching: Matching = "shared"
    reuse_steps: int = 1
    match_window: tuple[int, int, int] | None | Literal["auto"] = "auto"
    max_score_elements: int = DEFAULT_MAX_SCORE_ELEMENTS
    block_ratios: tuple[float, ...] = ()
    whole_steps: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be a number in [0, 1), got {self.ratio!r}")
        object.__setattr__(self, "stride", _positive_triple("stride", self.stride))
        cells = self.stride[0] * self.stride[1] * self.stride[2]
        if (self.ratio > 0 or any(self.block_ratios)) and cells == 1:
            raise ValueError(f"stride {self.stride} makes every token a destination: nothing can merge")
        if self.ratio > self.max_ratio + 1e-9:  # refused, never silently run at the cap
            raise ValueError(
                f"ratio must be at most 1 - 1/(st*sy*sx) = {self.max_ratio:.4g} for stride {self.stride} (one token in "
                f"every {cells} is a destination and cannot merge), got {self.ratio!r}")
        if self.strategy not in ("bipartite", "attnbin"):
            raise ValueError(f"strategy must be 'bipartite' or 'attnbin', got {self.strategy!r}")
        if self.matching not in ("shared", "per_sample"):
            raise ValueError(f"matching must be 'shared' or 'per_sample', got {self.matching!r}")
        if isinstance(self.blocks, str):
            if self.blocks not in ("all", "every_other"):
                raise ValueError(f"blocks must be 'all', 'every_other' or a list of indices, got {self.blocks!r}")
        else:
            blocks = tuple(self.blocks)
            if not blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in blocks):
                raise ValueError(f"blocks must be non-negative block indices, got {self.blocks!r}")
            object.__setattr__(self, "blocks", tuple(sorted(set(blocks))))
        if not (self.merge_self_attn or self.merge_cross_attn or self.merge_ffn):
            raise ValueError("at least one of merge_self_attn, merge_cross_attn, merge_ffn must be enabled")
        if isinstance(self.reuse_steps, bool) or not isinstance(self.reuse_steps, int) or self.reuse_steps < 1:
            raise ValueError(f"reuse_steps must be an integer >= 1, got {self.reuse_steps!r}")
        if isinstance(self.whole_steps, bool) or not isinstance(self.whole_steps, int) or self.whole_steps < 0:
            raise ValueError(f"whole_steps must be an integer >= 0, got {self.whole_steps!r}")
        if self.match_window == "auto":
            window = DEFAULT_MATCH_WINDOW if self.strategy == "bipartite" else None
            object.__setattr__(self, "match_window", window)
        elif self.match_window is not None:
            if self.strategy == "attnbin":
                raise ValueError("attnbin picks destinations in norm order, not in space: use match_window=None")
            object.__setattr__(self, "match_window", _positive_triple("match_window", self.match_window))
        if not isinstance(self.max_score_elements, int) or self.max_score_elements < 1:
            raise ValueError(f"max_score_elements must be a positive integer, got {self.max_score_elements!r}")
        object.__setattr__(self, "block_ratios", tuple(self.block_ratios))
        for index, ratio in enumerate(self.block_ratios):
            number = isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
            if not number or not 0.0 <= ratio <= self.max_ratio + 1e-9:
                raise ValueError(f"block {index}'s ratio must be a number in [0, {self.max_ratio:.4g}] for stride "
                                 f"{self.stride}, got {ratio!r}")
        if self.block_ratios and self.blocks != "all":
            raise ValueError("a ratio per block chooses the blocks itself (0: left alone): use blocks='all' with it")

    def ratio_of(self, block: int) -> float:
        """The merge ratio of block ``block``: its own from ``block_ratios``, else ``ratio``."""
        if self.block_ratios:
            return self.block_ratios[block] if block < len(self.block_ratios) else 0.0
        return self.ratio

    @property
    def merges(self) -> bool:
        """Whether any block merges at all (ratio 0 everywhere installs nothing)."""
        return any(self.block_ratios) if self.block_ratios else self.ratio > 0

    @property
    def requested_ratio(self) -> float:
        """The ratio asked for: ``ratio``, or the mean over the blocks that merge of their own (the
        blocks the effective ratio is counted over)."""
        merging = [ratio for ratio in self.block_ratios if ratio > 0]
        return sum(merging) / len(merging) if merging else (0.0 if self.block_ratios else self.ratio)

    @property
    def max_ratio(self) -> float:
        """The largest ratio the stride allows: only the cells' non-destination tokens can merge."""
        return 1.0 - 1.0 / (self.stride[0] * self.stride[1] * self.stride[2])

    @property
    def targets(self) -> frozenset[str]:
        """Sub-layer kinds that run on merged tokens."""
        chosen = {
            "self_attn": self.merge_self_attn,
            "cross_attn": self.merge_cross_attn,
            "ffn": self.merge_ffn,
        }
        return frozenset(name for name, on in chosen.items() if on)

    def selects_block(self, index: int) -> bool:
        if self.blocks == "all":
            return True
        if self.blocks == "every_other":
            return index % 2 == 0
        return index in self.blocks


def _positive_triple(name: str, value) -> tuple[int, int, int]:
    try:
        triple = tuple(value)
    except TypeError:
        triple = ()
    if len(triple) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in triple):
        raise ValueError(f"{name} must be three positive integers (t, y, x), got {value!r}")
    return triple
