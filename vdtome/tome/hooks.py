"""Reversible hooks that run chosen sub-layers of a video transformer on merged tokens.

Three pieces, all reversible: removing them restores the original ``forward`` of every module:

* a :class:`DenoiserHook` (a torch forward pre-hook) on the transformer (or UNet) reads the
  token grid from the latent of each call and tracks denoising steps and the calls in a step
  ("cond" / "uncond");
* a :class:`BlockMatcher` per patched block computes (or reuses) one matching per call;
* a :class:`MergeSiteHook` (a diffusers ``ModelHook``) on each patched sub-layer merges its video tokens (and gathers the
  rotary tables / masks that go with them), runs the sub-layer, and unmerges its output.

Matching, merging and unmerging run under ``torch.profiler.record_function`` ranges named
``vdtome.match``, ``vdtome.merge`` and ``vdtome.unmerge`` so their cost shows in any profile.

The block's own normalisation, adaLN modulation, gates and residuals run at full size, so nothing
outside the patched sub-layers sees a change of sequence length.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.profiler import record_function

from vdtome.core.diffusers_compat import hook_registry, remove_hooks_named
from vdtome.core.steps import StepContext
from vdtome.tome.config import ToMeConfig
from vdtome.tome.merge import Grid, Merge, attnbin_matching, bipartite_soft_matching_3d, merge_count
from vdtome.tome.sites import DenoiserState, MergeSite, SiteStats

HOOK_NAME = "vdtome_tome"

class ForwardPreHook:
    """A plain torch forward pre-hook that reads each call's arguments by name (``read``).

    Not a diffusers ``ModelHook``: accelerate's model offloading re-installs ``module.forward``
    after every pipeline call, which would silently drop a hook that replaces ``forward``, but it
    leaves ``_forward_pre_hooks`` alone.
    """

    def __init__(self) -> None:
        self._arguments: _ArgumentReader | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def read(self, module: torch.nn.Module, arguments: dict[str, Any]) -> None:
        raise NotImplementedError

    def attach(self, module: torch.nn.Module) -> None:
        self._arguments = _ArgumentReader(type(module).forward)
        self._handle = module.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    @torch.compiler.disable
    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.read(module, self._arguments(module, args, kwargs))


class DenoiserHook(ForwardPreHook):
    """Reads the grid at every call of the transformer / UNet and the step from the shared context.

    Registered after the context's own pre-hook, so the step it copies is the current call's.
    """

    def __init__(self, read_grid: Callable[[torch.nn.Module, dict], tuple[Grid, Grid]], context: StepContext) -> None:
        super().__init__()
        self.state = DenoiserState()
        self.context = context
        self._read_grid = read_grid

    def read(self, module: torch.nn.Module, arguments: dict[str, Any]) -> None:
        grid, latent_size = self._read_grid(module, arguments)
        steps, state = self.context.state, self.state
        state.grid, state.latent_size = grid, latent_size
        state.run, state.step, state.call_in_step, state.call_index = (steps.run, steps.step, steps.call_in_step,
                                                                       steps.call_index)


@dataclass
class _CachedMerge:
    merge: Merge
    run: int
    call_index: int
    step: int


class BlockMatcher:
    """Computes one matching per block call (or per ``reuse_steps`` steps) and shares it."""

    def __init__(
        self,
        block_index: int,
        config: ToMeConfig,
        denoiser: DenoiserHook,
        token_grid: Callable[[DenoiserState, int], Grid],
    ) -> None:
        self.block_index = block_index
        self.config = config
        self.ratio = config.ratio_of(block_index)
        self.denoiser = denoiser
        self.token_grid = token_grid
        self._cache: dict[tuple, _CachedMerge] = {}

    def whole_step(self) -> bool:
        """The current denoising step is one of the first ``whole_steps``: every token computed."""
        return self.denoiser.state.step < self.config.whole_steps

    def grid_for(self, num_tokens: int) -> Grid:
        return self.token_grid(self.denoiser.state, num_tokens)

    def matching(self, video: torch.Tensor, grid: Grid) -> Merge:
        state = self.denoiser.state
        key = (state.call_in_step, video.shape[0], grid, video.device)
        cached = self._cache.get(key)
        if cached is not None and cached.run == state.run:
            same_call = cached.call_index == state.call_index
            if same_call or (self.config.reuse_steps > 1 and state.step - cached.step < self.config.reuse_steps):
                return cached.merge
        merge = self._compute(video, grid, state.step)
        self._cache[key] = _CachedMerge(merge, state.run, state.call_index, state.step)
        return merge

    def _compute(self, video: torch.Tensor, grid: Grid, step: int) -> Merge:
        config = self.config
        generator = None
        if config.random_destinations:
            generator = torch.Generator(device="cpu").manual_seed(_mix_seed(config.seed, self.block_index, step))
        r = merge_count(video.shape[1], self.ratio)
        per_sample = config.matching == "per_sample"
        if config.strategy == "attnbin":
            return attnbin_matching(
                video,
                math.prod(config.stride),
                r,
                generator=generator,
                per_sample=per_sample,
                max_score_elements=config.max_score_elements,
            )
        return bipartite_soft_matching_3d(
            video,
            grid,
            config.stride,
            r,
            generator=generator,
            per_sample=per_sample,
            window=config.match_window,
            max_score_elements=config.max_score_elements,
        )

    def clear(self) -> None:
        self._cache.clear()


def _mix_seed(seed: int, block: int, step: int) -> int:
    """Deterministic, well-spread seed for one (block, step) draw."""
    return (seed * 0x9E3779B97F4A7C15 + block * 0xBF58476D1CE4E5B9 + max(step, 0) * 0x94D049BB133111EB) % (1 << 63)


class MergeSiteHook(ModelHook):
    """Runs one sub-layer on merged video tokens and restores the full sequence after it.

    ``active_merge``: the matching the sub-layer is running on, while it runs (None otherwise):
    a method acting inside the sub-layer (tile sparsity) reads which tokens it sees from it."""

    def __init__(self, site: MergeSite, matcher: BlockMatcher, stats: SiteStats) -> None:
        super().__init__()
        self.site = site
        self.matcher = matcher
        self.stats = stats
        self.active_merge: Merge | None = None
        self._arguments: _ArgumentReader | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._arguments = _ArgumentReader(type(module).forward)
        return module

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.merged_forward(module, self.fn_ref.original_forward, args, kwargs)

    def merged_forward(self, module: torch.nn.Module, forward: Callable, args: tuple, kwargs: dict):
        """``forward(*args, **kwargs)`` on this site's merged tokens, its output unmerged (a ratio
        search runs one call so for each candidate matcher)."""
        site = self.site
        tokens = self._arguments(module, args, kwargs).get(site.tokens)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            raise ValueError(
                f"vdtome: {type(module).__name__} ({site.module}) expected 3D tokens in {site.tokens!r}, "
                f"got {type(tokens).__name__}"
            )
        grid = self.matcher.grid_for(tokens.shape[1])
        num_video = math.prod(grid)
        prefix = tokens.shape[1] - num_video
        if prefix < 0:
            raise ValueError(
                f"vdtome: block {self.stats.block} {site.module} received {tokens.shape[1]} tokens but the latent grid "
                f"{grid} has {num_video}; the model's token layout does not match its adapter"
            )
        if merge_count(num_video, self.matcher.ratio) == 0 or self.matcher.whole_step():
            # Too few tokens for one merge, or a step kept whole: the sub-layer untouched, its arguments unbound.
            self._record(num_video, num_video)
            return forward(*args, **kwargs)
        call = _Call(self._arguments.signature.bind(module, *args, **kwargs))
        with record_function("vdtome.match"):
            merge = _matching_eager(self.matcher, tokens[:, prefix:], grid)
        self._record(num_video, merge.num_kept)
        if merge.num_merged == 0:
            return forward(*args, **kwargs)
        with record_function("vdtome.merge"):
            call.set(site.tokens, _merge_after(tokens, prefix, merge))
            for name, transform in site.transforms:
                value = call.get(name)
                if value is not None:
                    call.set(name, transform(value, merge, prefix))
        self.active_merge = merge
        try:
            output = forward(*call.args, **call.kwargs)
        finally:
            self.active_merge = None
        with record_function("vdtome.unmerge"):
            if site.output_index is None:
                return _unmerge_after(output, prefix, merge)
            output = list(output)
            output[site.output_index] = _unmerge_after(output[site.output_index], prefix, merge)
            return tuple(output)

    def _record(self, tokens_in: int, tokens_out: int) -> None:
        stats = self.stats
        stats.calls += 1
        stats.tokens_in, stats.tokens_out = tokens_in, tokens_out
        stats.total_in += tokens_in
        stats.total_out += tokens_out


@torch.compiler.disable
def _matching_eager(matcher: BlockMatcher, video: torch.Tensor, grid: Grid) -> Merge:
    """Matching keeps Python state (caches, step counts): never trace it into a compiled graph."""
    return matcher.matching(video, grid)


def _merge_after(tokens: torch.Tensor, prefix: int, merge: Merge) -> torch.Tensor:
    if prefix == 0:
        return merge.merge(tokens)
    return torch.cat([tokens[:, :prefix], merge.merge(tokens[:, prefix:])], dim=1)


def _unmerge_after(tokens: torch.Tensor, prefix: int, merge: Merge) -> torch.Tensor:
    if prefix == 0:
        return merge.unmerge(tokens)
    return torch.cat([tokens[:, :prefix], merge.unmerge(tokens[:, prefix:])], dim=1)


class _ArgumentReader:
    """A forward call's arguments by name, read without ``Signature.bind``: zipping the positional
    names costs a fraction of a bind, which every hook pays at every call. Arguments not passed are
    absent (no defaults filled in): callers read required arguments or ones whose default is None."""

    def __init__(self, forward: Callable) -> None:
        self.signature = inspect.signature(forward)
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self._names = tuple(p.name for p in list(self.signature.parameters.values())[1:] if p.kind in positional)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
        if len(args) <= len(self._names):
            return dict(zip(self._names, args)) | kwargs
        return self.signature.bind(module, *args, **kwargs).arguments  # *args beyond the named ones


class _Call:
    """Bound call arguments that can be read and rewritten by name, **kwargs included."""

    def __init__(self, bound: inspect.BoundArguments) -> None:
        self._bound = bound
        self._var_keyword = next(
            (p.name for p in bound.signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
        )

    def get(self, name: str) -> Any:
        arguments = self._bound.arguments
        if name in arguments:
            return arguments[name]
        if self._var_keyword is not None:
            return arguments.get(self._var_keyword, {}).get(name)
        return None

    def set(self, name: str, value: Any) -> None:
        arguments = self._bound.arguments
        if name in arguments or name in self._bound.signature.parameters:
            arguments[name] = value
        else:
            arguments.setdefault(self._var_keyword, {})[name] = value

    @property
    def args(self) -> tuple:
        return self._bound.args[1:]  # drop the module itself

    @property
    def kwargs(self) -> dict:
        return self._bound.kwargs


def register(module: torch.nn.Module, hook: ModelHook) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)


def denoiser_hooks(model: torch.nn.Module) -> list[DenoiserHook]:
    return [
        hook.__self__
        for hook in model._forward_pre_hooks.values()
        if isinstance(getattr(hook, "__self__", None), DenoiserHook)
    ]


def _site_registries(model: torch.nn.Module) -> list[HookRegistry]:
    registries = (hook_registry(module) for module in model.modules())
    return [r for r in registries if r is not None and r.get_hook(HOOK_NAME) is not None]


def is_registered(model: torch.nn.Module) -> bool:
    return bool(denoiser_hooks(model) or _site_registries(model))


def unregister(model: torch.nn.Module) -> None:
    """Remove every vdtome hook under ``model``; other hooks (caches, offloading) stay."""
    remove_hooks_named(model, HOOK_NAME)
    for hook in denoiser_hooks(model):
        hook.detach()
        hook.context.release()
    invalidate_registry_caches(model)


def invalidate_registry_caches(model: torch.nn.Module) -> None:
    """Diffusers caches which sub-modules carry hooks; adding or removing ours stales that list."""
    registry = hook_registry(model)
    if registry is not None:
        registry.invalidate_child_registries_cache()
