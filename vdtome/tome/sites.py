"""What an architecture adapter declares about a model, without diffusers: where its blocks take
merged tokens (:class:`MergeSite`), the per-call state the blocks read, and the argument rewrites
(rotary tables, masks) that go with a merge. The hooks that act on them are in
:mod:`vdtome.tome.hooks`; keeping these apart lets the adapters (and the models token merging
supports) be read without importing diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from vdtome.tome.merge import Grid, Merge

# An argument rewrite: (value, merge, number of tokens before the video tokens) -> new value.
ArgTransform = Callable[[Any, Merge, int], Any]


@dataclass(frozen=True)
class MergeSite:
    """Where a block's sub-layer gets merged tokens, as an adapter describes it.

    The video tokens are the last N tokens of the ``tokens`` argument (N from the grid); any
    tokens before them (text in a joint FFN, conditioning latents) pass through unmerged.
    """

    target: str  # "self_attn" | "cross_attn" | "ffn"
    module: str  # attribute path of the sub-layer inside the block, e.g. "attn1"
    tokens: str = "hidden_states"
    output_index: int | None = None  # the sub-layer returns a tuple; unmerge this element
    transforms: tuple[tuple[str, ArgTransform], ...] = ()


@dataclass
class SiteStats:
    block: int
    target: str
    module: str
    calls: int = 0
    tokens_in: int = 0  # video tokens at the last call
    tokens_out: int = 0  # video tokens that reached the sub-layer at the last call
    total_in: int = 0
    total_out: int = 0


@dataclass
class DenoiserState:
    """What one denoiser call tells the blocks: the grid, and where the call is in the denoising
    loop (copied from the pipeline's shared :class:`vdtome.core.steps.StepContext`)."""

    grid: Grid | None = None
    latent_size: Grid | None = None
    call_index: int = -1  # calls since the run began
    step: int = -1
    call_in_step: int = -1  # 0 for a step's first call (e.g. cond), 1 for the next (uncond), ...
    run: int = 0


# ---- argument transforms shared by adapters ---------------------------------------------------


def gather_rotary(token_dim: int, batched: bool) -> ArgTransform:
    """Gather a (cos, sin) pair (or one tensor) at the kept tokens' positions.

    ``token_dim`` is the token axis of each table; ``batched`` says whether dim 0 is the batch.
    Unbatched tables get a batch axis only for a per-sample matching.
    """

    def transform(tables: Any, merge: Merge, prefix: int) -> Any:
        if isinstance(tables, (tuple, list)):
            return type(tables)(transform(t, merge, prefix) for t in tables)
        dim = token_dim % tables.dim()
        if not batched and not merge.shared:
            tables, dim = tables.unsqueeze(0), dim + 1
        if prefix == 0:
            return merge.gather(tables, dim)
        head, video = tables.split([prefix, tables.shape[dim] - prefix], dim=dim)
        return torch.cat([head, merge.gather(video, dim)], dim=dim)

    return transform


def gather_mask_head(dim: int = -1) -> ArgTransform:
    """Gather the leading video part of a mask laid out [video, text] along ``dim``."""

    def transform(mask: torch.Tensor, merge: Merge, prefix: int) -> torch.Tensor:
        axis = dim % mask.dim()
        video, rest = mask.split([merge.num_tokens, mask.shape[axis] - merge.num_tokens], dim=axis)
        if merge.shared:
            video = merge.gather(video, axis)
        else:
            video = merge.gather(video.expand(merge.kept.shape[0], *video.shape[1:]), axis)
            rest = rest.expand(video.shape[0], *rest.shape[1:])
        return torch.cat([video, rest], dim=axis)

    return transform
