"""Token merging math for video tokens laid out on a (T, H, W) grid.

Pure tensor code: no diffusers import, no module state. A matching function looks at a metric
(B, N, C) once and returns a :class:`Merge`, whose ``merge`` shrinks any (B, N, C) tensor to
(B, N - r, C) by averaging each merged source into its destination, and whose ``unmerge`` restores
(B, N, C) by copying every destination's value back to the sources merged into it.

Conventions (chosen to generalise ToMe for Stable Diffusion, Bolya & Hoffman 2023):

* tokens are ordered (t, h, w) with w fastest, as every diffusers video DiT patchifies them;
* the grid is cut into cells of ``stride`` (st, sy, sx); one token per full cell is a destination
  (a random position drawn from a dedicated generator, or the cell's first position), all other
  tokens are sources, including tokens in partial cells at the border;
* each source scores its best destination by cosine similarity; the ``r`` best-scoring sources
  merge (mean), the rest pass through; ``r`` is capped at the number of sources;
* the reduced sequence keeps its tokens in ascending order of original position, and a merged
  group stands at its destination's position (``Merge.kept``), which is what rotary embeddings
  and attention masks must be gathered with.

With T = 1, stride (1, sy, sx), global matching and per-sample scoring this is ToMe for SD's
``bipartite_soft_matching_random2d``; with the same generator state it draws the same
destinations.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

Grid = tuple[int, int, int]

# Budget for one block of similarity scores, in elements. Never materialise more than this or the
# metric's own size, whichever is larger: the attention that follows allocates at least q, k and v
# of the metric's size, so matching cannot raise the peak above what attention already needs.
DEFAULT_MAX_SCORE_ELEMENTS = 1 << 22


@dataclass(frozen=True, eq=False)
class Merge:
    """One matching of ``num_tokens`` tokens to ``num_tokens - num_merged``.

    Index tensors have a leading dimension of 1 (one matching shared by the whole batch) or B
    (one matching per sample).
    """

    num_tokens: int
    kept: torch.Tensor | None = None  # (B', N - r) original position each reduced token stands at
    src: torch.Tensor | None = None  # (B', r) positions merged away
    src_slot: torch.Tensor | None = None  # (B', r) reduced slot each merged source joins
    slot_of: torch.Tensor | None = None  # (B', N) reduced slot each original position reads back
    group_size: torch.Tensor | None = None  # (B', N - r, 1) members of each reduced token (float32)

    @property
    def num_merged(self) -> int:
        return 0 if self.src is None else self.src.shape[1]

    @property
    def num_kept(self) -> int:
        return self.num_tokens - self.num_merged

    @property
    def shared(self) -> bool:
        return self.kept is None or self.kept.shape[0] == 1

    def _check(self, x: torch.Tensor, length: int, what: str) -> None:
        if x.shape[1] != length:
            raise ValueError(f"{what} expects {length} tokens on dim 1, got shape {tuple(x.shape)}")
        if not self.shared and x.shape[0] != self.kept.shape[0]:
            raise ValueError(
                f"{what}: per-sample matching was made for batch {self.kept.shape[0]}, got batch {x.shape[0]}"
            )

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): each merged group becomes the mean of its members."""
        self._check(x, self.num_tokens, "merge")
        if self.num_merged == 0:
            return x
        # Half-precision sums of many members lose digits: accumulate in float32, cast back once.
        accumulate = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        out = _take_rows(x, self.kept).to(accumulate)
        src = _take_rows(x, self.src).to(accumulate)
        # index_add + divide is several times faster than scatter_reduce("mean") on CPU and GPU.
        # On CUDA both add atomically, so the summation order (and the last bit) may vary run to run.
        if self.shared:
            out.index_add_(1, self.src_slot[0], src)
        else:
            out.scatter_add_(1, self.src_slot.unsqueeze(-1).expand(-1, -1, x.shape[-1]), src)
        return out.div_(self.group_size).to(x.dtype)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C): every member of a group receives the group's value."""
        self._check(y, self.num_kept, "unmerge")
        if self.num_merged == 0:
            return y
        return _take_rows(y, self.slot_of)

    def gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Keep, along ``dim``, the entries of ``t`` at the reduced tokens' positions.

        For rotary tables and masks indexed by token position. With a per-sample matching ``t``
        gets the batch on dim 0 (broadcast from size 1 if needed).
        """
        if t.shape[dim] != self.num_tokens:
            raise ValueError(f"gather expects {self.num_tokens} entries on dim {dim}, got shape {tuple(t.shape)}")
        if self.num_merged == 0:
            return t
        if self.shared:
            return t.index_select(dim, self.kept[0])
        dim = dim % t.dim()
        if dim == 0:
            raise ValueError("a per-sample matching needs the batch on dim 0 and tokens on another dim")
        batch = self.kept.shape[0]
        t = t.expand(batch, *t.shape[1:])
        shape = [1] * t.dim()
        shape[0], shape[dim] = batch, self.num_kept
        index = self.kept.view(shape).expand(*t.shape[:dim], self.num_kept, *t.shape[dim + 1 :])
        return t.gather(dim, index)


def _take_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x[b, positions[b or 0]] for x (B, N, C) and positions (1 or B, K)."""
    if positions.shape[0] == 1:
        return x.index_select(1, positions[0])
    return x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def merge_count(num_tokens: int, ratio: float) -> int:
    """ToMe for SD's ratio semantics: r = int(ratio * N) (capped later by the number of sources)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"merge ratio must be in [0, 1), got {ratio}")
    return int(num_tokens * ratio)


def effective_stride(grid: Grid, stride: tuple[int, int, int]) -> tuple[int, int, int]:
    """Clamp the stride to the grid so every axis has at least one full cell (e.g. T = 1)."""
    if len(grid) != 3 or len(stride) != 3:
        raise ValueError(f"grid and stride must be (t, h, w) triples, got {grid} and {stride}")
    if min(grid) < 1 or min(stride) < 1:
        raise ValueError(f"grid and stride must be positive, got grid {grid} and stride {stride}")
    return tuple(min(s, n) for s, n in zip(stride, grid))


def max_merge_ratio(grid: Grid, stride: tuple[int, int, int]) -> float:
    """Largest ratio that still merges only sources: 1 - (full cells) / N."""
    stride = effective_stride(grid, stride)
    cells = math.prod(n // s for n, s in zip(grid, stride))
    return 1.0 - cells / math.prod(grid)


def _norm(metric: torch.Tensor, keepdim: bool = True) -> torch.Tensor:
    """L2 norm over channels, never zero (a zero token gets cosine 0, not NaN)."""
    return metric.norm(dim=-1, keepdim=keepdim).clamp_min(torch.finfo(metric.dtype).tiny)


def _normalise(metric: torch.Tensor) -> torch.Tensor:
    return metric / _norm(metric)


def _scoring_metric(metric: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """Normalised metric; for a shared matching the batch is folded into channels.

    Folding makes one dot product the sum of the per-sample cosines, so a shared matching ranks
    pairs by their mean similarity over the batch (e.g. cond and uncond) at per-sample cost.
    """
    if per_sample or metric.shape[0] == 1:
        return _normalise(metric)
    batch, tokens, channels = metric.shape
    norm = _norm(metric)
    folded = metric.new_empty(tokens, batch, channels)  # normalise straight into the folded copy
    torch.div(metric.transpose(0, 1), norm.transpose(0, 1), out=folded)
    return folded.view(1, tokens, batch * channels)


def _inverse_norm(metric: torch.Tensor) -> torch.Tensor:
    return _norm(metric, keepdim=False).reciprocal()


def _destination_positions(
    grid: Grid, stride: tuple[int, int, int], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Position of the destination of every full cell, in cell raster order, (cells,).

    Offsets are drawn on the generator's device (CPU for a CPU generator) so the diffusion RNG is
    never touched and the same seed picks the same destinations on every device.
    """
    origins = _cell_origins(grid, stride, device)
    if generator is None:
        return origins
    _, h, w = grid
    st, sy, sx = stride
    # (cells..., 1) mirrors ToMe for SD's draw so T = 1 reproduces its destinations.
    cells = tuple(n // s for n, s in zip(grid, stride))
    offset = torch.randint(st * sy * sx, size=(*cells, 1), generator=generator, device=generator.device)
    offset = _to_device(offset, device).flatten()
    return origins + (offset // (sy * sx) * h + offset // sx % sy) * w + offset % sx


@functools.lru_cache(maxsize=64)
def _cell_origins(grid: Grid, stride: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Position of the first token of every full cell, (cells,). Cached: shapes only; read-only."""
    t, h, w = grid
    st, sy, sx = stride
    ct = torch.arange(t // st, device=device).view(-1, 1, 1) * st
    cy = torch.arange(h // sy, device=device).view(1, -1, 1) * sy
    cx = torch.arange(w // sx, device=device).view(1, 1, -1) * sx
    return ((ct * h + cy) * w + cx).flatten()


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device`` without making the host wait for the GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _complement(num_tokens: int, taken: torch.Tensor) -> torch.Tensor:
    """Ascending positions not in ``taken`` (P, K) -> (P, N - K)."""
    mask = torch.zeros(taken.shape[0], num_tokens, dtype=torch.int8, device=taken.device)
    mask.scatter_(1, taken, 1)
    if mask.device.type == "cpu":
        return (mask == 0).nonzero()[:, 1].view(taken.shape[0], num_tokens - taken.shape[1])
    # nonzero would wait for the device to learn the output size; a stable sort does not.
    return mask.argsort(dim=1, stable=True)[:, : num_tokens - taken.shape[1]]


def _best_destination_global(
    score_metric: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, max_elements: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max cosine and argmax destination for every source, in row chunks of bounded size."""
    rows_total = score_metric.shape[0]
    num_src, num_dst = src.shape[1], dst.shape[1]
    dst_metric = _take_rows(score_metric, dst).transpose(1, 2)
    rows = max(1, min(num_src, max_elements // (rows_total * num_dst)))
    # One reused buffer: fresh multi-MiB blocks per chunk fragment glibc's heap on CPU (the peak
    # grew by the size of the whole score matrix in our tests).
    buffer = score_metric.new_empty(rows_total * rows * num_dst)
    best = score_metric.new_empty(rows_total, num_src)
    index = torch.empty(rows_total, num_src, dtype=torch.int64, device=score_metric.device)
    for start in range(0, num_src, rows):
        chunk = _take_rows(score_metric, src[:, start : start + rows])
        scores = buffer[: rows_total * chunk.shape[1] * num_dst].view(rows_total, chunk.shape[1], num_dst)
        torch.matmul(chunk, dst_metric, out=scores)
        value, arg = scores.max(dim=-1)
        best[:, start : start + rows] = value
        index[:, start : start + rows] = arg
    return best, index


class _Windows(NamedTuple):
    tokens: torch.Tensor  # (W, Tmax) token positions per window; padding reads position 0
    padding: torch.Tensor | None  # (W, Tmax) True where ``tokens`` is padding; None if none is
    cells: torch.Tensor  # (W, Cmax) cell indices per window; padding reads cell 0
    cell_padding: torch.Tensor | None  # (W, Cmax) True where ``cells`` is padding; None if none is
    slot_of_position: torch.Tensor  # (N,) where each token stands in the flattened (W * Tmax) layout
    boxes: tuple[int, ...] | None  # (nt, wt, nh, wh, nw, ww) when windows tile the grid exactly


@functools.lru_cache(maxsize=64)
def _window_tables(
    grid: Grid, stride: tuple[int, int, int], window: tuple[int, int, int], device: torch.device
) -> _Windows:
    """Static layout of the local windows: which tokens and which cells each window holds.

    Border tokens outside full cells join the nearest full cell on each axis, so every token has
    exactly one window. Cached: it depends on shapes only, not on the random destinations.
    """
    cells = tuple(n // s for n, s in zip(grid, stride))
    win = tuple(min(w, c) for w, c in zip(window, cells))
    n_win = tuple(-(-c // w) for c, w in zip(cells, win))

    def window_index(t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ((t.view(-1, 1, 1) * n_win[1] + h.view(1, -1, 1)) * n_win[2] + w.view(1, 1, -1)).flatten()

    def padding_mask(table: torch.Tensor) -> torch.Tensor | None:
        return (table < 0).to(device) if bool((table < 0).any()) else None

    cell_of_token = [torch.clamp(torch.arange(n) // s, max=c - 1) for n, s, c in zip(grid, stride, cells)]
    tokens = _group_by(window_index(*(c // w for c, w in zip(cell_of_token, win))), math.prod(n_win))
    cell_table = _group_by(window_index(*(torch.arange(c) // w for c, w in zip(cells, win))), math.prod(n_win))
    slot_of_position = torch.empty(math.prod(grid), dtype=torch.int64)
    real = tokens.flatten() >= 0
    slot_of_position[tokens.flatten()[real]] = torch.arange(tokens.numel())[real]
    # Windows that tile the grid exactly hold boxes of tokens in raster order: a view, no table.
    extents = [w * s for w, s in zip(win, stride)]
    tiles = all(n % e == 0 for n, e in zip(grid, extents))
    boxes = tuple(v for n, e in zip(grid, extents) for v in (n // e, e)) if tiles else None
    return _Windows(
        tokens.clamp_min(0).to(device),
        padding_mask(tokens),
        cell_table.clamp_min(0).to(device),
        padding_mask(cell_table),
        slot_of_position.to(device),
        boxes,
    )


def _group_by(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Members of each group as rows padded with -1: (num_groups, max group size)."""
    order = group.argsort(stable=True)
    counts = torch.bincount(group, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(group.numel()) - starts[group[order]]
    table = torch.full((num_groups, int(counts.max())), -1, dtype=torch.int64)
    table[group[order], rank] = order
    return table


def _window_view(x: torch.Tensor, boxes: tuple[int, ...]) -> torch.Tensor:
    """(S, N, C) in grid order seen window by window: (S, nt, nh, nw, wt, wh, ww, C), no copy."""
    rows, _, channels = x.shape
    nt, wt, nh, wh, nw, ww = boxes
    return x.view(rows, nt, wt, nh, wh, nw, ww, channels).permute(0, 1, 3, 5, 2, 4, 6, 7)


def _normalised_windows(
    metric: torch.Tensor, inverse_norm: torch.Tensor | None, tables: _Windows, windows: slice, out: torch.Tensor
) -> torch.Tensor:
    """The tokens of ``windows`` in window order, scaled to unit norm where ``inverse_norm`` is given."""
    if tables.boxes is not None and windows == slice(0, tables.tokens.shape[0]):
        # Windows tile the grid: one strided pass lays out (and scales) every token.
        source = _window_view(metric, tables.boxes)
        target = out.view(source.shape)
        if inverse_norm is None:
            target.copy_(source)
        else:
            torch.mul(source, _window_view(inverse_norm.unsqueeze(-1), tables.boxes), out=target)
        return out
    tok = tables.tokens[windows].flatten()
    torch.index_select(metric, 1, tok, out=out)
    if inverse_norm is not None:
        out.mul_(inverse_norm.index_select(1, tok).unsqueeze(-1))
    return out


def _best_destination_windowed(
    score_metric: torch.Tensor,
    inverse_norm: torch.Tensor | None,
    dst_by_cell: torch.Tensor,
    grid: Grid,
    stride: tuple[int, int, int],
    window: tuple[int, int, int],
    max_elements: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every token's max cosine and argmax cell, comparing only within its window.

    Cost is linear in N (each token meets one window of destinations) and every window is one
    small dense matmul. Returns (candidates (1, M), best (S, M), best cell (S, M)) in window order,
    M = windows x their largest token count: the candidates are token positions, and destinations
    and padding score -inf, so a top-r (r <= number of sources) only ever picks sources. Keeping
    window order spares the scatter back to position order and the gather of the sources.
    """
    tables = _window_tables(grid, stride, window, score_metric.device)
    n_win, t_max = tables.tokens.shape
    c_max = tables.cells.shape[1]
    rows, num_tokens, channels = score_metric.shape
    dst_slot_by_cell = tables.slot_of_position[dst_by_cell]
    not_source = torch.zeros(n_win * t_max, dtype=torch.bool, device=score_metric.device)
    not_source[dst_slot_by_cell] = True
    if tables.padding is not None:
        not_source |= tables.padding.flatten()
    # Each window's destinations in the window-order layout; padded cells read the window's first
    # token (a slot inside the window: chunks hold whole windows) and are masked out below.
    dst_slots = dst_slot_by_cell[tables.cells]
    if tables.cell_padding is not None:
        first = torch.arange(n_win, device=dst_slots.device).unsqueeze(1) * t_max
        dst_slots = torch.where(tables.cell_padding, first, dst_slots)
    best = score_metric.new_empty(rows, n_win * t_max)
    best_cell = torch.empty(rows, n_win * t_max, dtype=torch.int64, device=score_metric.device)
    step = max(1, min(n_win, max_elements // (rows * t_max * max(c_max, channels))))
    # Reused buffers, as in the global path: no fresh large blocks per chunk.
    token_buffer = score_metric.new_empty(rows * step * t_max * channels)
    score_buffer = score_metric.new_empty(rows * step * t_max * c_max)
    for start in range(0, n_win, step):
        windows = slice(start, min(start + step, n_win))
        cel = tables.cells[windows]
        count = cel.shape[0]
        span = slice(start * t_max, (start + count) * t_max)
        tok_metric = token_buffer[: rows * count * t_max * channels].view(rows, count * t_max, channels)
        _normalised_windows(score_metric, inverse_norm, tables, windows, tok_metric)
        # A window's destinations are among its own tokens: take them from the normalised copy.
        dst_metric = tok_metric.index_select(1, dst_slots[windows].flatten() - start * t_max)
        dst_metric = dst_metric.view(rows, count, c_max, channels)
        scores = score_buffer[: rows * count * t_max * c_max].view(rows, count, t_max, c_max)
        torch.matmul(tok_metric.view(rows, count, t_max, channels), dst_metric.transpose(-1, -2), out=scores)
        if tables.cell_padding is not None:
            scores.masked_fill_(tables.cell_padding[windows].unsqueeze(1), float("-inf"))
        value, arg = scores.max(dim=-1)
        best[:, span] = value.flatten(1).masked_fill_(not_source[span], float("-inf"))
        best_cell[:, span] = cel.unsqueeze(0).expand(rows, -1, -1).gather(2, arg).flatten(1)
    return tables.tokens.view(1, -1), best, best_cell


def _assemble(
    num_tokens: int, src: torch.Tensor, dst: torch.Tensor, best: torch.Tensor, best_dst: torch.Tensor, r: int
) -> Merge:
    """Pick the r most similar sources and build the index tensors of the merge.

    ``src`` (P, Ns) and ``dst`` (P, Nd) are positions; ``best``/``best_dst`` (S, Ns) are every
    source's best score and destination index into ``dst``. P is 1 or S. Candidates scoring -inf
    (destinations, padding) are never picked: callers cap r at the number of real sources.
    """
    rows = best.shape[0]
    src, dst = src.expand(rows, -1), dst.expand(rows, -1)
    merged_rank = best.topk(r, dim=-1, sorted=False).indices
    merged = src.gather(1, merged_rank)
    merged_into = dst.gather(1, best_dst.gather(1, merged_rank))
    kept = _complement(num_tokens, merged)  # unmerged sources and all destinations, ascending
    slot_of = torch.empty(rows, num_tokens, dtype=torch.int64, device=src.device)
    slot_of.scatter_(1, kept, torch.arange(kept.shape[1], device=src.device).expand(rows, -1))
    src_slot = slot_of.gather(1, merged_into)
    slot_of.scatter_(1, merged, src_slot)
    group_size = torch.ones(rows, kept.shape[1], device=src.device)
    group_size.scatter_add_(1, src_slot, torch.ones(rows, r, device=src.device))
    return Merge(num_tokens, kept, merged, src_slot, slot_of, group_size.unsqueeze(-1))


def bipartite_soft_matching_3d(
    metric: torch.Tensor,
    grid: Grid,
    stride: tuple[int, int, int],
    r: int,
    *,
    generator: torch.Generator | None = None,
    per_sample: bool = True,
    window: tuple[int, int, int] | None = None,
    max_score_elements: int = DEFAULT_MAX_SCORE_ELEMENTS,
) -> Merge:
    """Match the tokens of ``metric`` (B, N, C), N = T * H * W, and merge the ``r`` best sources.

    ``generator`` None puts each destination at its cell's first position. ``per_sample`` False
    gives one matching for the whole batch (ranked by mean cosine over the batch). ``window``
    (in cells) restricts each source to destinations in its local window of cells, which makes
    matching linear in N; None compares every source with every destination (ToMe).
    """
    batch, num_tokens, _ = metric.shape
    if math.prod(grid) != num_tokens:
        raise ValueError(f"grid {grid} holds {math.prod(grid)} tokens but the metric has {num_tokens}")
    stride = effective_stride(grid, stride)
    if r <= 0:  # nothing merges: skip drawing destinations
        return Merge(num_tokens)
    dst_by_cell = _destination_positions(grid, stride, generator, metric.device)
    r = min(r, num_tokens - dst_by_cell.numel())
    if r <= 0:
        return Merge(num_tokens)
    with torch.no_grad():
        budget = max(max_score_elements, metric.numel())
        dst = dst_by_cell.unsqueeze(0)
        if window is None:
            src = _complement(num_tokens, dst)
            best, best_dst = _best_destination_global(_scoring_metric(metric, per_sample), src, dst, budget)
        else:
            if per_sample or batch == 1:
                # The windowed path gathers copies of the tokens anyway: normalise those copies
                # instead of allocating a normalised metric (fresh large CPU blocks page-fault).
                score_metric, inverse_norm = metric, _inverse_norm(metric)
            else:
                score_metric, inverse_norm = _scoring_metric(metric, per_sample), None
            src, best, best_dst = _best_destination_windowed(
                score_metric, inverse_norm, dst_by_cell, grid, stride, window, budget
            )
        return _assemble(num_tokens, src, dst, best, best_dst, r)


def attnbin_matching(
    metric: torch.Tensor,
    bin_size: int,
    r: int,
    *,
    generator: torch.Generator | None = None,
    per_sample: bool = True,
    max_score_elements: int = DEFAULT_MAX_SCORE_ELEMENTS,
) -> Merge:
    """The "attnbin" variant: destinations chosen in L2-norm order rather than in space.

    Tokens are sorted by norm and cut into bins of ``bin_size``; one token per full bin (random,
    or the first) is a destination. Matching is then global cosine bipartite matching as above.
    """
    batch, num_tokens, _ = metric.shape
    if bin_size < 2:
        raise ValueError(f"attnbin needs bins of at least 2 tokens, got {bin_size}")
    num_bins = num_tokens // bin_size
    r = min(r, num_tokens - num_bins)
    if r <= 0 or num_bins == 0:
        return Merge(num_tokens)
    with torch.no_grad():
        norms = metric.float().norm(dim=-1)
        if not per_sample:
            norms = norms.mean(dim=0, keepdim=True)
        by_norm = norms.argsort(dim=1, stable=True)
        if generator is None:
            offset = torch.zeros(num_bins, dtype=torch.int64, device=metric.device)
        else:
            offset = torch.randint(bin_size, (num_bins,), generator=generator, device=generator.device)
            offset = _to_device(offset, metric.device)
        slots = torch.arange(num_bins, device=metric.device) * bin_size + offset
        dst = by_norm[:, slots]
        src = _complement(num_tokens, dst)
        score_metric = _scoring_metric(metric, per_sample)
        budget = max(max_score_elements, metric.numel())
        best, best_dst = _best_destination_global(score_metric, src, dst, budget)
        return _assemble(num_tokens, src, dst, best, best_dst, r)
