"""Attention-tile sparsity (Efficient-vDiT's training-free part) as pure tensor math: no diffusers import.

The 3D attention of a video DiT, cut into frame-to-frame tiles (queries of latent frame i against
keys of latent frame j), is dominated by the diagonal tiles and a few "global" reference frames.
A pattern ``G:P`` over ``T = G + P`` latent frames keeps, for every query frame, the tiles of

* its own frame (the diagonal), and
* the ``G`` global frames (the first ones, or evenly spaced),

and skips the rest. A global frame's own tile is one of the ``G``: its queries see ``G`` frames and
``P`` are pruned; any other frame's queries see ``G + 1`` frames (its own is kept as well) and
``P - 1`` are pruned. Text tokens (joint-attention models) attend to everything and are attended
by everything. The cost is linear in ``T``: each query frame runs one attention over the keys it
keeps, gathered, never over a dense score matrix. :func:`allowed_keys` builds the masked dense
reference the gathered computation must equal.

Video tokens are frame-major (the order the models patchify in: frame, then rows, then columns),
``tokens_per_frame`` to a frame, starting at ``video_start`` in the sequence; every other position
is text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PLACEMENTS = ("first", "spaced")


@dataclass(frozen=True)
class TilePattern:
    """``global_frames`` (G) of ``frames`` (T = G + P) latent frames kept for every query frame."""

    global_frames: int
    pruned_frames: int

    @property
    def frames(self) -> int:
        return self.global_frames + self.pruned_frames

    def text(self) -> str:
        return f"{self.global_frames}:{self.pruned_frames}"


def parse_pattern(text: str) -> TilePattern | None:
    """``"dense"`` -> None; ``"G:P"`` (whole numbers, G >= 1, P >= 0) -> the pattern."""
    cleaned = str(text).strip().lower()
    if cleaned == "dense":
        return None
    match = re.fullmatch(r"([0-9]+)\s*:\s*([0-9]+)", cleaned)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"a tile pattern is 'dense' or G:P with G >= 1 global frames and P pruned ones, got {text!r}")
    return TilePattern(int(match.group(1)), int(match.group(2)))


def global_frame_ids(frames: int, count: int, placement: str = "first") -> tuple[int, ...]:
    """The ``count`` global frames of ``frames``: the first ones, or spread evenly from the first to
    the last."""
    if placement not in PLACEMENTS:
        raise ValueError(f"global frames are placed {' or '.join(PLACEMENTS)}, got {placement!r}")
    if not 1 <= count <= frames:
        raise ValueError(f"{count} global frames do not fit {frames} latent frames")
    if placement == "first" or count == 1:
        return tuple(range(count))
    return tuple(sorted({round(i * (frames - 1) / (count - 1)) for i in range(count)}))


@dataclass(frozen=True)
class TileLayout:
    """Where a sequence's video tokens are: ``frames`` latent frames of ``tokens_per_frame`` tokens
    each from position ``video_start``, in a sequence of ``length`` (the rest is text)."""

    frames: int
    tokens_per_frame: int
    video_start: int
    length: int

    def __post_init__(self) -> None:
        end = self.video_start + self.frames * self.tokens_per_frame
        if self.frames < 1 or self.tokens_per_frame < 1 or self.video_start < 0 or end > self.length:
            raise ValueError(f"{self.frames} frames x {self.tokens_per_frame} tokens from {self.video_start} do not "
                             f"fit a sequence of {self.length}")

    @property
    def video_end(self) -> int:
        return self.video_start + self.frames * self.tokens_per_frame

    def frame_positions(self, frame: int, device: torch.device | None = None) -> torch.Tensor:
        start = self.video_start + frame * self.tokens_per_frame
        return torch.arange(start, start + self.tokens_per_frame, device=device)

    def text_positions(self, device: torch.device | None = None) -> torch.Tensor:
        return torch.cat([torch.arange(0, self.video_start, device=device),
                          torch.arange(self.video_end, self.length, device=device)])


def kept_frames(frame: int, global_ids: tuple[int, ...]) -> tuple[int, ...]:
    """The frames a query frame attends: the global ones and its own, in order."""
    return tuple(sorted(set(global_ids) | {frame}))


def allowed_keys(layout: TileLayout, global_ids: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """The (length, length) boolean mask of the pattern (True: the query attends the key): the
    dense reference of :func:`tile_sparse_attention`."""
    allowed = torch.ones(layout.length, layout.length, dtype=torch.bool, device=device)
    video = slice(layout.video_start, layout.video_end)
    allowed[video, video] = False
    for frame in range(layout.frames):
        rows = layout.frame_positions(frame, device)
        for kept in kept_frames(frame, global_ids):
            allowed[rows.unsqueeze(1), layout.frame_positions(kept, device).unsqueeze(0)] = True
    return allowed


def tile_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: TileLayout,
                          global_ids: tuple[int, ...], attn_mask: torch.Tensor | None = None,
                          scale: float | None = None) -> tuple[torch.Tensor, int]:
    """Attention over (batch, heads, length, width) tensors under the pattern, computed per query
    frame over its gathered keys (and the text queries over every key); returns the output and the
    number of (query, key) pairs scored, to compare with the dense ``length ** 2``.

    ``attn_mask``: a boolean or additive mask broadcastable to (batch, heads, length, length), as
    ``scaled_dot_product_attention`` takes it (its rows and columns are gathered with the keys)."""
    length = query.shape[-2]
    if key.shape[-2] != length or layout.length != length:
        raise ValueError(f"tile sparsity is for self-attention over the layout's {layout.length} tokens, got "
                         f"{length} queries and {key.shape[-2]} keys")
    device = query.device
    out = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=device)
    scored = 0
    text = layout.text_positions(device)
    groups = [(text, torch.arange(length, device=device))] if text.numel() else []
    for frame in range(layout.frames):
        keys = torch.cat([text, *(layout.frame_positions(f, device) for f in kept_frames(frame, global_ids))])
        groups.append((layout.frame_positions(frame, device), keys.sort().values))
    for rows, keys in groups:
        mask = None
        if attn_mask is not None:
            mask = attn_mask
            if mask.shape[-2] != 1:
                mask = mask.index_select(-2, rows)
            if mask.shape[-1] != 1:
                mask = mask.index_select(-1, keys)
        out[..., rows, :] = F.scaled_dot_product_attention(
            query.index_select(-2, rows), key.index_select(-2, keys), value.index_select(-2, keys),
            attn_mask=mask, scale=scale)
        scored += rows.numel() * keys.numel()
    return out, scored
