"""Attention-tile sparsity's hooks (its declaration, config and form are in
:mod:`vdtome.methods.tile_sparsity`): a ``ModelHook`` per block's self-attention running it on the
layer's pattern, the denoiser's token grid read at every call, and the search's probe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch.overrides import TorchFunctionMode

from vdtome.core.calibration import ErrorTally
from vdtome.core.denoisers import denoisers_of, unwrap
from vdtome.core.diffusers_compat import hook_registry
from vdtome.core.steps import StepContext
from vdtome.core.tile_sparsity import (QueryGroups, flex_block_mask, flex_mask_supported, flex_tile_attention,
                                       global_frame_ids, place_video, query_groups, tile_sparse_attention)
from vdtome.core.validation import RequestError
from vdtome.methods.base import Evidence, MethodReport
from vdtome.methods.module_hooks import SDPA_KERNEL, attach, detach, sdpa_arguments
from vdtome.methods.tile_sparsity import NAME, TileSparsity, summary
from vdtome.tome.adapters import Adapter, find_adapter
from vdtome.tome.hooks import HOOK_NAME as TOME_HOOK
from vdtome.tome.hooks import ForwardPreHook

HOOK = "vdtome_tile_sparsity"


@dataclass
class LayerStats:
    calls: int = 0  # self-attention calls over the video
    sparse_calls: int = 0  # ... run on the tile pattern
    scored: int = 0  # (query, key) pairs scored, per batch x head
    dense: int = 0  # ... and those a dense call scores


class _Grid(ForwardPreHook):
    """On a denoiser: the token grid of its current call."""

    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.grid: tuple[int, int, int] | None = None

    def read(self, module: torch.nn.Module, arguments: dict[str, Any]) -> None:
        self.grid = self.adapter.read_grid(module, arguments)[0]


class _Kernel:
    """The attention the pattern runs on: gathered keys, or FlexAttention's block mask (compiled
    once per process on CUDA; eager elsewhere, exact but building the scores)."""

    compiled = None

    def __init__(self, choice: str) -> None:
        self.choice = choice

    def flex(self, device: torch.device) -> bool:
        return self.choice == "flex" or (self.choice == "auto" and device.type == "cuda")

    def run(self, call: dict, groups: QueryGroups, block_mask: Callable[[], Any]) -> torch.Tensor:
        """``block_mask()``: the layout's FlexAttention block mask (built on first use, then cached)."""
        query, key, value = call["query"], call["key"], call["value"]
        mask, scale = call.get("attn_mask"), call.get("scale")
        if self.flex(query.device) and flex_mask_supported(mask, query.shape[0]):
            attention = None
            if query.device.type == "cuda":
                if _Kernel.compiled is None:
                    from torch.nn.attention.flex_attention import flex_attention

                    _Kernel.compiled = torch.compile(flex_attention, dynamic=False)
                attention = _Kernel.compiled
            return flex_tile_attention(query, key, value, block_mask(), scale, attention)
        return tile_sparse_attention(query, key, value, groups, mask, scale)


class _SparseMode(TorchFunctionMode):
    """Active inside one self-attention module's call: its attention runs on the layer's pattern."""

    def __init__(self, hook: "TileSparseAttention", module: torch.nn.Module) -> None:
        super().__init__()
        self.hook = hook
        self.module = module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not SDPA_KERNEL:
            return func(*args, **kwargs)
        out = self.hook.attend(self.module, sdpa_arguments(args, kwargs))
        return func(*args, **kwargs) if out is None else out


class TileSparseAttention(ModelHook):
    """One block's self-attention on its layer's pattern (see :class:`_SparseMode`)."""

    def __init__(self, applied: "AppliedTileSparsity", layer: int, grid: _Grid) -> None:
        super().__init__()
        self.applied = applied
        self.layer = layer
        self.grid = grid
        self.stats = applied.layers[layer]
        self.pattern = applied.config.pattern_of(layer)
        self._ids: tuple[tuple, torch.Tensor] | None = None
        # (the layout's key: ids, global frames, the caller's mask, batch), its groups, its block mask
        self._layout: tuple[tuple, QueryGroups, dict] | None = None

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        with _SparseMode(self, module):
            return self.fn_ref.original_forward(*args, **kwargs)

    def sequence(self, module: torch.nn.Module, call: dict) -> tuple[torch.Tensor, int] | None:
        """(each position's frame id, the latent frame count) of a self-attention call over the
        video, or None for a call the pattern does not apply to (cross-attention, causal, dropout,
        grouped heads, no video); the ids are cached while the layout stays."""
        query, key = call["query"], call["key"]
        grid = self.grid.grid
        length = query.shape[-2]
        if (grid is None or key.shape[-2] != length or call.get("is_causal") or call.get("dropout_p")
                or call.get("enable_gqa") or key.shape[-3] != query.shape[-3]):
            return None
        frames, per_frame = grid[0], grid[1] * grid[2]
        merge = self._active_merge(module)
        video = merge.num_kept if merge is not None else frames * per_frame
        if video > length:
            return None
        video_start = 0 if self.applied.adapter.text_after_video else length - video
        cache_key = (length, video_start, frames, per_frame, query.device, id(merge))
        if self._ids is None or self._ids[0] != cache_key:
            if merge is None:
                video_frames = torch.arange(frames, device=query.device).repeat_interleave(per_frame)
            else:
                video_frames = merge.kept[0].to(query.device) // per_frame
            self._ids = (cache_key, place_video(video_frames, length, video_start))
        return self._ids[1], frames

    def attend(self, module: torch.nn.Module, call: dict) -> torch.Tensor | None:
        """The call's output on the pattern, or None to run it as it is."""
        sequence = self.sequence(module, call)
        if sequence is None:
            return None
        ids, frames = sequence
        stats, config = self.stats, self.applied.config
        length = ids.numel()
        stats.calls += 1
        stats.dense += length * length
        pattern = self.pattern
        if pattern is None or pattern.pruned_frames == 0 or self.applied.context.state.step < config.dense_steps:
            stats.scored += length * length
            return None
        if pattern.frames != frames:
            where = f"schedule {config.schedule!r} (layer {self.layer})" if config.schedule else "the tile pattern"
            raise RequestError(f"{where} is {pattern.text()}: G + P = {pattern.frames}, but this request has {frames} "
                               f"latent frames; use G:P with G + P = {frames}, e.g. 1:{frames - 1}",
                               f"{NAME}_schedule" if config.schedule else f"{NAME}_pattern")
        global_ids = global_frame_ids(frames, pattern.global_frames, config.placement)
        mask, batch = call.get("attn_mask"), call["query"].shape[0]
        key = self._layout[0] if self._layout is not None else None
        if key is None or key[0] is not ids or key[1] != global_ids or key[2] is not mask or key[3] != batch:
            # Tensors by identity (the key holds them, so no new tensor can take their id).
            self._layout = ((ids, global_ids, mask, batch), query_groups(ids, global_ids), {})
        _, groups, block_masks = self._layout

        def block_mask():
            if "mask" not in block_masks:
                block_masks["mask"] = flex_block_mask(ids, global_ids, mask, batch)
            return block_masks["mask"]

        stats.sparse_calls += 1
        stats.scored += groups.scored
        return self.applied.kernel.run(call, groups, block_mask)

    def _active_merge(self, module: torch.nn.Module):
        """The token-merging matching this sub-layer runs on, if any (shared across the batch)."""
        registry = hook_registry(module)
        tome = registry.get_hook(TOME_HOOK) if registry is not None else None
        merge = getattr(tome, "active_merge", None)
        if merge is None or merge.num_merged == 0:
            return None
        if not merge.shared:
            raise RequestError("tile sparsity stacks with token merging's shared matching only: each merged token "
                               "keeps its destination's frame, which must be one for the whole batch; set matching "
                               "to shared", "matching")
        return merge


class PatternProbe(TileSparseAttention):
    """A search's measurement: each self-attention call runs densely (the trajectory stays the
    baseline's) while every pattern G:(T - G) is computed beside it on the same inputs, tallying
    each G's relative error (L2 of the attention output) over the calls."""

    def __init__(self, applied: "AppliedTileSparsity", layer: int, grid: _Grid) -> None:
        super().__init__(applied, layer, grid)
        self.errors = ErrorTally()
        self.frames: int | None = None
        self._candidates: tuple[torch.Tensor, dict[int, QueryGroups]] | None = None  # per layout: G -> groups

    def attend(self, module: torch.nn.Module, call: dict) -> torch.Tensor | None:
        sequence = self.sequence(module, call)
        if sequence is None or self.applied.context.state.step < self.applied.config.dense_steps:
            return None
        ids, frames = sequence
        self.frames = frames
        dense = SDPA_KERNEL(**call)
        if self._candidates is None or self._candidates[0] is not ids:  # the layout changed (or the first call)
            placement = self.applied.config.placement
            self._candidates = (ids, {count: query_groups(ids, global_frame_ids(frames, count, placement))
                                      for count in range(1, frames)})
        for count, groups in self._candidates[1].items():
            sparse = tile_sparse_attention(call["query"], call["key"], call["value"], groups,
                                           call.get("attn_mask"), call.get("scale"))
            self.errors.add(count, sparse, dense)
        return dense


class PatternSearch:
    """Attached for ``python -m vdtome search --method tile_sparsity``: the calibration calls run
    through it, then :meth:`choose` gives each layer the sparsest pattern within the threshold."""

    def __init__(self, pipe: Any, config: TileSparsity) -> None:
        self.config = config
        self.applied = AppliedTileSparsity(pipe, TileSparsity(placement=config.placement,
                                                              dense_steps=config.dense_steps), hook=PatternProbe)

    def remove(self) -> None:
        self.applied.remove()

    def choose(self, threshold: float) -> dict[str, Any]:
        probes = self.applied.hooks
        frames = next((probe.frames for probe in probes if probe.frames), None)
        if frames is None:
            raise ValueError("the calibration calls ran no self-attention over the video")
        layers = []
        for probe in probes:
            fits = probe.errors.within(threshold)
            layers.append(f"{fits[0]}:{frames - fits[0]}" if fits else "dense")
        return {"latent_frames": frames, "placement": self.config.placement, "dense_steps": self.config.dense_steps,
                "layers": layers,
                "errors": [p.errors.figures(lambda count: f"{count}:{frames - count}") for p in probes]}


def attention_layers(model: torch.nn.Module, adapter: Adapter) -> list[torch.nn.Module]:
    """Each block's self-attention module, in block order (a schedule's layer order)."""
    layers = []
    for block in adapter.blocks(model):
        site = next(site for site in adapter.sites(block) if site.target == "self_attn")
        layers.append(block.get_submodule(site.module))
    return layers


class AppliedTileSparsity:
    """``hook``: the hook each self-attention layer gets (a search's probe measures instead)."""

    def __init__(self, pipe: Any, config: TileSparsity, hook: type = TileSparseAttention) -> None:
        self.config = config
        self.denoisers = denoisers_of(pipe)
        self.kernel = _Kernel(config.kernel)
        owner = self.denoisers[0] if isinstance(pipe, torch.nn.Module) else pipe
        plans = []
        for model in self.denoisers:
            adapter = find_adapter(model)
            if not adapter.frames_attended:
                raise ValueError(f"tile sparsity needs attention over every frame's tokens; "
                                 f"{type(unwrap(model)).__name__}'s self-attention sees one frame at a time")
            layers = attention_layers(unwrap(model), adapter)
            if config.layer_patterns and len(config.layer_patterns) != len(layers):
                raise RequestError(f"schedule {config.schedule!r} has {len(config.layer_patterns)} layers; "
                                   f"{type(unwrap(model)).__name__} has {len(layers)}", f"{NAME}_schedule")
            for layer in layers:
                tome = hook_registry(layer).get_hook(TOME_HOOK) if hook_registry(layer) is not None else None
                if tome is not None and tome.matcher.config.matching != "shared":
                    raise RequestError("tile sparsity stacks with token merging's shared matching only: each merged "
                                       "token keeps its destination's frame, which must be one for the whole batch; "
                                       "set matching to shared", "matching")
            plans.append((model, adapter, layers))
        self.adapter = plans[0][1]
        self.layers = [LayerStats() for _ in range(max(len(layers) for _, _, layers in plans))]
        self.context = StepContext.acquire(owner)
        self.grids: list[_Grid] = []
        self.hooks: list[TileSparseAttention] = []
        try:
            for model, adapter, layers in plans:
                grid = _Grid(adapter)
                grid.attach(model)
                self.grids.append(grid)
                made = {id(layer): hook(self, index, grid) for index, layer in enumerate(layers)}
                self.hooks.extend(made.values())
                attach(layers, lambda module, made=made: made[id(module)], HOOK, [model])
        except BaseException:
            self.remove()
            raise

    def reset(self) -> None:
        for stats in self.layers:
            vars(stats).update(vars(LayerStats()))

    def remove(self) -> None:
        detach(self.denoisers, HOOK)
        for grid in self.grids:
            grid.detach()
        if self.context is not None:
            self.context.release()
            self.context = None
        self.grids = []

    def report(self) -> MethodReport:
        calls = sum(s.calls for s in self.layers)
        sparse_calls = sum(s.sparse_calls for s in self.layers)
        scored, dense = sum(s.scored for s in self.layers), sum(s.dense for s in self.layers)
        rows, notes = [], []
        if dense:
            rows.append(("self-attention pairs scored (sparse / dense)", f"{scored / dense:.0%}",
                         f"attention FLOP ideal {dense / scored:.2f}x over {calls} calls"))
        kernel = "FlexAttention block mask" if self.kernel.flex(self._device()) else "gathered keys per query frame"
        if sparse_calls and self.kernel.flex(self._device()) and self._device().type != "cuda":
            notes.append("FlexAttention ran eagerly (not compiled off CUDA): it builds every score and skips no "
                         "tile, so it is exact but no faster; the gather kernel skips them here")
        if not self.config.sparse:
            notes.append("pattern dense: every self-attention call ran as it was (the identity)")
        return MethodReport(
            method=NAME,
            summary={"settings": summary(self.config), "pairs scored": round(scored / dense, 3) if dense else None},
            rows=tuple(rows),
            notes=tuple(notes),
            detail={"kernel": kernel, "calls": calls, "sparse_calls": sparse_calls, "pairs_scored": scored,
                    "pairs_dense": dense,
                    "layers": [{"layer": index, "pattern": (p.text() if (p := self.config.pattern_of(index)) else
                                                            "dense"),
                                "calls": s.calls, "sparse_calls": s.sparse_calls, "pairs_scored": s.scored,
                                "pairs_dense": s.dense} for index, s in enumerate(self.layers)]},
            evidence=(Evidence("self-attention calls run on the tile pattern", sparse_calls, calls),
                      Evidence("self-attention (query, key) pairs skipped", dense - scored, dense)),
        )

    def _device(self) -> torch.device:
        parameter = next(self.denoisers[0].parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")
