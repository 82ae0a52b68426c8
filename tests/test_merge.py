"""Unit tests of the pure merge math (vdtome.tome.merge)."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import vdtome.tome.merge as merge_module
from vdtome.tome.merge import Merge, attnbin_matching, bipartite_soft_matching_3d, max_merge_ratio, merge_count


def tokens(batch, n, channels=16, seed=0, dtype=torch.float64):
    return torch.randn(batch, n, channels, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def destinations(merge: Merge) -> torch.Tensor:
    """Positions (B', ·) that received at least one source."""
    return merge.kept.gather(1, merge.src_slot)


def group_members(merge: Merge, row: int = 0) -> dict[int, list[int]]:
    slots = merge.slot_of[row].tolist()
    groups: dict[int, list[int]] = {}
    for position, slot in enumerate(slots):
        groups.setdefault(slot, []).append(position)
    return groups


@pytest.mark.parametrize("height,width", [(8, 8), (7, 9), (6, 10), (5, 5)])
@pytest.mark.parametrize("use_rand", [False, True])
def test_t1_reproduces_tome_for_sd(height, width, use_rand):
    tomesd = pytest.importorskip("tomesd.merge")
    x = tokens(2, height * width)
    r = int(0.5 * height * width)
    ref_merge, ref_unmerge = tomesd.bipartite_soft_matching_random2d(
        x, width, height, 2, 2, r, no_rand=not use_rand, generator=torch.Generator().manual_seed(7)
    )
    ours = bipartite_soft_matching_3d(
        x, (1, height, width), (1, 2, 2), r, generator=torch.Generator().manual_seed(7) if use_rand else None
    )
    reference = ref_merge(x)
    merged = ours.merge(x)
    assert merged.shape == reference.shape
    # Same groups and means; the order inside the reduced sequence differs (ours ascends) and so
    # may the order of summation, hence float64 and a tolerance of a few ulps.
    tight = dict(rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(merged.sort(dim=1).values, reference.sort(dim=1).values, **tight)
    torch.testing.assert_close(ours.unmerge(merged), ref_unmerge(reference), **tight)
    # A token-wise function commutes with the order, so a sub-layer sees the same thing.
    torch.testing.assert_close(ours.unmerge(torch.tanh(merged)), ref_unmerge(torch.tanh(reference)), **tight)


def test_round_trip_keeps_unmerged_tokens_and_copies_destinations():
    grid = (3, 6, 8)
    x = tokens(2, math.prod(grid))
    merge = bipartite_soft_matching_3d(x, grid, (1, 2, 2), 60, generator=torch.Generator().manual_seed(1), per_sample=True)
    merged = merge.merge(x)
    restored = merge.unmerge(merged)
    assert merged.shape == (2, x.shape[1] - 60, 16)
    for row in range(2):
        for members in group_members(merge, row).values():
            mean = x[row, members].mean(dim=0)
            for position in members:
                if len(members) == 1:
                    assert torch.equal(restored[row, position], x[row, position])
                else:
                    torch.testing.assert_close(restored[row, position], mean)
    # Each merged source reads back exactly its destination's output.
    dst = destinations(merge)
    assert torch.equal(restored.gather(1, merge.src[..., None].expand(-1, -1, 16)),
                       restored.gather(1, dst[..., None].expand(-1, -1, 16)))


def test_token_counts_and_ratio_cap():
    grid = (4, 6, 6)
    n = math.prod(grid)
    cells = 4 * 3 * 3
    x = tokens(1, n)
    assert merge_count(n, 0.5) == n // 2
    assert bipartite_soft_matching_3d(x, grid, (1, 2, 2), merge_count(n, 0.5)).num_kept == n - n // 2
    # r is capped at the number of sources: never more than N - cells tokens merge.
    capped = bipartite_soft_matching_3d(x, grid, (1, 2, 2), merge_count(n, 0.95))
    assert capped.num_merged == n - cells
    assert max_merge_ratio(grid, (1, 2, 2)) == pytest.approx(1 - cells / n)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        merge_count(n, 1.0)
    with pytest.raises(ValueError, match="grid"):
        bipartite_soft_matching_3d(x, (4, 6, 5), (1, 2, 2), 10)


@pytest.mark.parametrize("grid,stride", [((3, 5, 7), (2, 2, 2)), ((5, 7, 9), (1, 3, 2)), ((1, 5, 5), (4, 2, 2))])
def test_non_divisible_grids(grid, stride):
    n = math.prod(grid)
    x = tokens(2, n)
    for window in (None, (1, 2, 2)):
        merge = bipartite_soft_matching_3d(
            x, grid, stride, n, generator=torch.Generator().manual_seed(3), window=window, per_sample=False
        )
        eff = tuple(min(s, g) for s, g in zip(stride, grid))
        cells = math.prod(g // s for g, s in zip(grid, eff))
        assert merge.num_kept == cells  # everything but one destination per full cell merged
        restored = merge.unmerge(merge.merge(x))
        assert restored.shape == x.shape
        # Every kept token is a destination: one per full cell.
        t, rem = merge.kept[0] // (grid[1] * grid[2]), merge.kept[0] % (grid[1] * grid[2])
        y, w = rem // grid[2], rem % grid[2]
        cell = (t // eff[0], y // eff[1], w // eff[2])
        assert all((c < g // s).all() for c, g, s in zip(cell, grid, eff))
        assert len(set(zip(*(c.tolist() for c in cell)))) == cells


def test_destinations_one_per_cell_first_position_without_randomness():
    grid = (2, 4, 4)
    merge = bipartite_soft_matching_3d(tokens(1, 32), grid, (1, 2, 2), 24)
    expected = sorted((t * 16 + y * 4 + x) for t in range(2) for y in (0, 2) for x in (0, 2))
    assert merge.kept[0].tolist() == expected


def test_random_destinations_are_seeded_and_spare_the_global_rng():
    grid = (3, 8, 8)
    x = tokens(2, 192)
    state = torch.get_rng_state()
    a = bipartite_soft_matching_3d(x, grid, (1, 2, 2), 96, generator=torch.Generator().manual_seed(5))
    b = bipartite_soft_matching_3d(x, grid, (1, 2, 2), 96, generator=torch.Generator().manual_seed(5))
    c = bipartite_soft_matching_3d(x, grid, (1, 2, 2), 96, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.slot_of, b.slot_of)
    assert not torch.equal(a.slot_of, c.slot_of)


def test_global_matching_is_independent_of_the_score_budget():
    grid = (4, 8, 8)
    x = tokens(2, 256)
    whole = bipartite_soft_matching_3d(x, grid, (1, 2, 2), 128, generator=torch.Generator().manual_seed(0))
    chunked = bipartite_soft_matching_3d(
        x, grid, (1, 2, 2), 128, generator=torch.Generator().manual_seed(0), max_score_elements=1
    )
    assert torch.equal(whole.slot_of, chunked.slot_of)


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("grid", [(5, 7, 9), (4, 8, 8)])
def test_windowed_matching_is_independent_of_the_score_budget(grid, per_sample, monkeypatch):
    """Scored in one chunk or a few windows at a time, the matching is the same: with uneven
    windows (padded tables, (5, 7, 9)) and with windows tiling the grid ((4, 8, 8): one chunk
    takes the strided-copy path, small chunks the gather path)."""
    chunks = []
    gather = merge_module._normalised_windows
    monkeypatch.setattr(merge_module, "_normalised_windows", lambda *a: chunks.append(a[3]) or gather(*a))
    x = tokens(2, math.prod(grid), channels=2)  # fewer channels than cells per window: small chunks
    kwargs = dict(per_sample=per_sample, window=(2, 2, 2))
    whole = bipartite_soft_matching_3d(x, grid, (1, 2, 2), 150, generator=torch.Generator().manual_seed(4), **kwargs)
    assert len(chunks) == 1
    chunked = bipartite_soft_matching_3d(
        x, grid, (1, 2, 2), 150, generator=torch.Generator().manual_seed(4), max_score_elements=1, **kwargs
    )
    assert len(chunks) > 2
    assert whole.num_merged == 150
    assert torch.equal(whole.slot_of, chunked.slot_of)


@pytest.mark.parametrize("grid", [(5, 7, 9), (4, 8, 8)])  # padded tables; one window tiling the grid
def test_window_covering_the_grid_equals_global_matching(grid):
    x = tokens(2, math.prod(grid))
    for per_sample in (True, False):
        kwargs = dict(generator=torch.Generator().manual_seed(1), per_sample=per_sample)
        glob = bipartite_soft_matching_3d(x, grid, (1, 2, 2), 150, **kwargs)
        kwargs["generator"] = torch.Generator().manual_seed(1)
        local = bipartite_soft_matching_3d(x, grid, (1, 2, 2), 150, window=(99, 99, 99), **kwargs)
        assert torch.equal(glob.slot_of, local.slot_of)


@pytest.mark.parametrize("grid", [(4, 12, 12), (5, 11, 13)])  # windows tile the grid; padded windows and cells
def test_windowed_sources_only_join_destinations_in_their_window(grid):
    stride, window = (1, 2, 2), (2, 2, 2)
    n = math.prod(grid)
    x = tokens(2, n)
    r = n - math.prod(g // s for g, s in zip(grid, stride))  # every source merges: padding must never win
    merge = bipartite_soft_matching_3d(
        x, grid, stride, r, generator=torch.Generator().manual_seed(2), window=window, per_sample=True
    )
    assert merge.num_merged == r

    def window_of(position):
        coords = (position // (grid[1] * grid[2]), position // grid[2] % grid[1], position % grid[2])
        # Border tokens outside full cells belong to the nearest full cell.
        return tuple(min(c // s, g // s - 1) // w for c, s, g, w in zip(coords, stride, grid, window))

    dst = destinations(merge)
    for row in range(2):
        for src, d in zip(merge.src[row].tolist(), dst[row].tolist()):
            assert window_of(src) == window_of(d)
    # Global matching on the same input does cross windows, so the restriction is real.
    glob = bipartite_soft_matching_3d(x, grid, stride, r, generator=torch.Generator().manual_seed(2))
    gdst = destinations(glob)
    assert any(window_of(s) != window_of(d) for s, d in zip(glob.src[0].tolist(), gdst[0].tolist()))


def test_shared_matching_serves_the_whole_batch():
    grid = (2, 6, 6)
    one = tokens(1, 72)
    twice = one.expand(2, -1, -1).contiguous()
    shared = bipartite_soft_matching_3d(twice, grid, (1, 2, 2), 36, per_sample=False)
    alone = bipartite_soft_matching_3d(one, grid, (1, 2, 2), 36, per_sample=True)
    assert shared.kept.shape[0] == 1
    assert torch.equal(shared.slot_of, alone.slot_of)
    # Different samples: a per-sample matching differs between rows, a shared one cannot.
    x = tokens(2, 72, seed=4)
    per = bipartite_soft_matching_3d(x, grid, (1, 2, 2), 36, per_sample=True)
    assert per.kept.shape[0] == 2 and not torch.equal(per.slot_of[0], per.slot_of[1])
    merged = bipartite_soft_matching_3d(x, grid, (1, 2, 2), 36, per_sample=False).merge(x)
    assert merged.shape == (2, 36, 16)


def test_gather_follows_kept_positions():
    grid = (2, 4, 4)
    x = tokens(2, 32, seed=9)
    positions = torch.arange(32, dtype=torch.float64)
    for per_sample in (False, True):
        merge = bipartite_soft_matching_3d(x, grid, (1, 2, 2), 16, per_sample=per_sample)
        table = positions.view(1, 32, 1, 1).expand(1, 32, 1, 4)  # Wan-style (1, S, 1, D)
        gathered = merge.gather(table, dim=1)
        assert gathered.shape == (merge.kept.shape[0], 16, 1, 4)
        assert torch.equal(gathered[:, :, 0, 0].long(), merge.kept)


def test_attnbin_picks_one_destination_per_norm_bin():
    n, bin_size = 64, 4
    x = tokens(2, n, seed=3)
    x = x * torch.linspace(0.5, 3.0, n, dtype=torch.float64)[torch.randperm(n, generator=torch.Generator().manual_seed(0))][:, None]
    merge = attnbin_matching(x, bin_size, n, generator=torch.Generator().manual_seed(0), per_sample=True)
    assert merge.num_kept == n // bin_size
    for row in range(2):
        rank = torch.empty(n, dtype=torch.long)
        rank[x[row].norm(dim=-1).argsort(stable=True)] = torch.arange(n)
        bins = sorted((rank[merge.kept[row]] // bin_size).tolist())
        assert bins == list(range(n // bin_size))
    partial = attnbin_matching(x, bin_size, n // 2, generator=torch.Generator().manual_seed(0), per_sample=False)
    assert partial.merge(x).shape == (2, n // 2, 16)


def test_zero_merges_return_the_input_untouched():
    x = tokens(2, 32)
    merge = bipartite_soft_matching_3d(x, (2, 4, 4), (1, 2, 2), 0)
    assert merge.num_merged == 0
    assert merge.merge(x) is x and merge.unmerge(x) is x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, (2, 2, 2)])
def test_low_precision_inputs(dtype, window):
    x = tokens(2, 4 * 8 * 8, dtype=dtype)
    merge = bipartite_soft_matching_3d(
        x, (4, 8, 8), (1, 2, 2), 128, generator=torch.Generator().manual_seed(0), window=window
    )
    assert merge.num_merged == 128
    merged = merge.merge(x)
    assert merged.dtype == dtype
    # Group means are summed in float32 and rounded once: exactly the float32 mean, cast.
    assert torch.equal(merged, merge.merge(x.float()).to(dtype))
    assert torch.equal(merge.unmerge(merged), merge.unmerge(merge.merge(x.float())).to(dtype))


@pytest.mark.slow
def test_chunked_scores_bound_peak_memory():
    """Global matching of 24k sources x 8k destinations would need a 768 MiB score matrix."""
    script = textwrap.dedent(
        """
        import resource, torch
        from vdtome.tome.merge import bipartite_soft_matching_3d
        torch.set_num_threads(1)
        x = torch.randn(1, 32768, 16)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        bipartite_soft_matching_3d(x, (8, 64, 64), (1, 2, 2), 16384)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=".")
    growth_mib = int(result.stdout.strip().splitlines()[-1])
    dense_mib = 24576 * 8192 * 4 // 2**20
    assert growth_mib < dense_mib // 8, f"peak grew {growth_mib} MiB; a dense score matrix is {dense_mib} MiB"
