"""What every architecture adapter provides, and the helpers most of them share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from vdtome.tome.merge import Grid
from vdtome.tome.sites import DenoiserState, MergeSite


def latent_grid(latent: torch.Tensor, patch: tuple[int, int, int], frames_dim: int = 2) -> Grid:
    """Token grid of a 5D latent after patchify; ``frames_dim`` is 2 for (B, C, F, H, W)."""
    frames, height, width = latent.shape[frames_dim], latent.shape[-2], latent.shape[-1]
    pt, ph, pw = patch
    return (-(-frames // pt), height // ph, width // pw)


def dit_token_grid(state: DenoiserState, num_tokens: int) -> Grid:
    """DiTs see the whole (T, H, W) grid in every block."""
    if state.grid is None:
        raise RuntimeError("vdtome: a patched block ran outside a call of its transformer")
    return state.grid


@dataclass(frozen=True)
class Adapter:
    """Model surgery for one architecture family.

    ``blocks`` lists the patchable blocks in order (block indices of the config refer to it);
    ``sites`` says which sub-layers of a block can run on merged tokens; ``read_grid`` returns
    (token grid, latent size) from the bound arguments of the model's forward; ``token_grid`` maps
    a sub-layer's token count to its grid; ``shared_only`` gives the reason a model cannot use
    per-sample matching, or None. ``frames_attended``: its self-attention sees every frame's
    tokens in one sequence (3D attention; AnimateDiff's sees one frame); ``text_after_video``: a
    joint attention puts text after the video tokens (HunyuanVideo, Mochi), not before
    (CogVideoX; LTX's conditioning tokens): tile sparsity reads where the video sits from it.
    """

    name: str
    model_classes: tuple[str, ...]
    blocks: Callable[[torch.nn.Module], list[torch.nn.Module]]
    sites: Callable[[torch.nn.Module], tuple[MergeSite, ...]]
    read_grid: Callable[[torch.nn.Module, dict], tuple[Grid | None, Grid | None]]
    token_grid: Callable[[DenoiserState, int], Grid] = dit_token_grid
    shared_only: Callable[[torch.nn.Module], str | None] = lambda model: None
    frames_attended: bool = True
    text_after_video: bool = False

    def handles(self, model: torch.nn.Module) -> bool:
        return type(model).__name__ in self.model_classes


