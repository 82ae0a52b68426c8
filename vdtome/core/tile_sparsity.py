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

A sequence is described by its frame ids: each position's latent frame, :data:`TEXT` for text.
Video tokens are frame-major as the models patchify them (:class:`TileLayout`); after token
merging a kept token carries its destination's frame, so the pattern applies to merged sequences
too. :func:`flex_tile_attention` gives the same attention through FlexAttention's block mask, where
a compiled kernel skips the dropped tiles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PLACEMENTS = ("first", "spaced")
TEXT = -1  # the frame id of a text position


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

    def frame_ids(self, device: torch.device | None = None) -> torch.Tensor:
        """Each position's latent frame (:data:`TEXT` for text)."""
        video = torch.arange(self.frames, device=device).repeat_interleave(self.tokens_per_frame)
        return place_video(video, self.length, self.video_start)


def place_video(video_frames: torch.Tensor, length: int, video_start: int) -> torch.Tensor:
    """A sequence's frame ids: ``video_frames`` (one per video token, in sequence order) from
    ``video_start``, text (:data:`TEXT`) around them."""
    ids = torch.full((length,), TEXT, dtype=torch.long, device=video_frames.device)
    ids[video_start:video_start + video_frames.numel()] = video_frames
    return ids


def kept_frames(frame: int, global_ids: tuple[int, ...]) -> tuple[int, ...]:
    """The frames a query frame attends: the global ones and its own, in order."""
    return tuple(sorted(set(global_ids) | {frame}))


def _keeps(query_frames: torch.Tensor, key_frames: torch.Tensor, global_ids: tuple[int, ...]) -> torch.Tensor:
    """Whether each (query, key) pair is scored: text on either side, the same frame, or a global key frame."""
    is_global = torch.isin(key_frames, torch.tensor(global_ids, device=key_frames.device))
    return (query_frames == TEXT) | (key_frames == TEXT) | (query_frames == key_frames) | is_global


def allowed_keys(frame_ids: torch.Tensor, global_ids: tuple[int, ...]) -> torch.Tensor:
    """The (length, length) boolean mask of the pattern (True: the query attends the key): the
    dense reference of :func:`tile_sparse_attention`."""
    return _keeps(frame_ids.unsqueeze(1), frame_ids.unsqueeze(0), global_ids)


@dataclass(frozen=True)
class QueryGroups:
    """The gathered computation of one sequence: (query positions, their key positions) per query
    frame, the text queries with every key; ``scored``: the (query, key) pairs it scores."""

    groups: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    scored: int
    length: int


def query_groups(frame_ids: torch.Tensor, global_ids: tuple[int, ...]) -> QueryGroups:
    """The groups of a sequence whose positions carry ``frame_ids`` (a frame's tokens need not be
    contiguous: after token merging each kept token carries its destination's frame)."""
    length = frame_ids.numel()
    positions = torch.arange(length, device=frame_ids.device)
    text = frame_ids == TEXT
    groups = [(positions[text], positions)] if bool(text.any()) else []
    global_keys = text | torch.isin(frame_ids, torch.tensor(global_ids, device=frame_ids.device))
    for frame in torch.unique(frame_ids[~text]).tolist():
        own = frame_ids == frame
        groups.append((positions[own], positions[global_keys | own]))
    return QueryGroups(tuple(groups), sum(rows.numel() * keys.numel() for rows, keys in groups), length)


def tile_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, groups: QueryGroups,
                          attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention over (batch, heads, length, width) tensors, each group's queries over its gathered
    keys only: the score matrix over all tokens is never built.

    ``attn_mask``: a boolean or additive mask broadcastable to (batch, heads, length, length), as
    ``scaled_dot_product_attention`` takes it (its rows and columns are gathered with the keys)."""
    length = query.shape[-2]
    if key.shape[-2] != length or groups.length != length:
        raise ValueError(f"tile sparsity is for self-attention over the layout's {groups.length} tokens, got "
                         f"{length} queries and {key.shape[-2]} keys")
    out = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)
    for rows, keys in groups.groups:
        mask = attn_mask
        if mask is not None and mask.shape[-2] != 1:
            mask = mask.index_select(-2, rows)
        if mask is not None and mask.shape[-1] != 1:
            mask = mask.index_select(-1, keys)
        out[..., rows, :] = F.scaled_dot_product_attention(
            query.index_select(-2, rows), key.index_select(-2, keys), value.index_select(-2, keys),
            attn_mask=mask, scale=scale)
    return out


def flex_mask_supported(attn_mask: torch.Tensor | None, batch: int) -> bool:
    """FlexAttention takes the pattern as a block mask; a caller's mask joins it only as a boolean
    key mask per sample (batch or 1, 1, 1, length), HunyuanVideo's text padding."""
    return attn_mask is None or (attn_mask.dtype == torch.bool and attn_mask.dim() == 4
                                 and attn_mask.shape[1] == attn_mask.shape[2] == 1 and attn_mask.shape[0] in (1, batch))


def flex_block_mask(frame_ids: torch.Tensor, global_ids: tuple[int, ...], attn_mask: torch.Tensor | None = None,
                    batch: int = 1):
    """FlexAttention's block mask of the pattern (and of a boolean key mask per sample, see
    :func:`flex_mask_supported`): built once per layout, it lets the kernel skip every (query
    block, key block) tile the pattern drops."""
    from torch.nn.attention.flex_attention import create_block_mask

    if not flex_mask_supported(attn_mask, batch):
        raise ValueError("FlexAttention takes a boolean key mask of shape (batch, 1, 1, length) only")
    is_global = torch.isin(frame_ids, torch.tensor(global_ids, device=frame_ids.device))
    keys_allowed = None if attn_mask is None else attn_mask[:, 0, 0, :]

    def pattern(b, h, q, k):
        keep = (frame_ids[q] == TEXT) | (frame_ids[k] == TEXT) | (frame_ids[q] == frame_ids[k]) | is_global[k]
        if keys_allowed is not None:
            keep = keep & keys_allowed[b if keys_allowed.shape[0] > 1 else 0, k]
        return keep

    length = frame_ids.numel()
    per_sample = None if keys_allowed is None or keys_allowed.shape[0] == 1 else batch
    return create_block_mask(pattern, per_sample, None, length, length, device=frame_ids.device)


def flex_tile_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask,
                        scale: float | None = None, attention=None) -> torch.Tensor:
    """The same attention as :func:`tile_sparse_attention` through FlexAttention and the block mask
    of :func:`flex_block_mask`. ``attention``: the (compiled) ``flex_attention`` to run; eager by
    default (exact, but it builds the scores and skips nothing)."""
    from torch.nn.attention.flex_attention import flex_attention

    return (attention or flex_attention)(query, key, value, block_mask=block_mask, scale=scale)
