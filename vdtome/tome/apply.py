"""``apply_tome`` / ``remove_tome``: patch a pipeline's denoiser(s) and undo it exactly."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vdtome.core.denoisers import denoisers_of
from vdtome.core.steps import StepContext
from vdtome.tome.adapters import find_adapter
from vdtome.tome.config import ToMeConfig
from vdtome.tome.hooks import (
    BlockMatcher,
    DenoiserHook,
    MergeSiteHook,
    invalidate_registry_caches,
    is_registered,
    register,
    unregister,
)
from vdtome.tome.sites import SiteStats


class ScheduleMismatch(ValueError):
    """A per-block ratio schedule made for a model with another number of blocks."""


@dataclass(frozen=True)
class ToMeStats:
    """Token counts seen by the patched sub-layers since the last ``reset``."""

    requested_ratio: float
    effective_ratio: float  # 1 - tokens out / tokens in over every patched sub-layer call
    blocks_patched: int
    blocks_total: int
    sites: tuple[SiteStats, ...]


@dataclass
class _Patched:
    model: torch.nn.Module
    denoiser: DenoiserHook | None  # None at ratio 0 (nothing installed)
    matchers: list[BlockMatcher]
    sites: list[SiteStats]
    blocks_total: int


@dataclass
class ToMeHandle:
    """What ``apply_tome`` patched; use it to read stats, reset between runs, or undo."""

    config: ToMeConfig
    patched: list[_Patched] = field(default_factory=list)
    active: bool = True

    @property
    def models(self) -> list[torch.nn.Module]:
        return [p.model for p in self.patched]

    def stats(self) -> ToMeStats:
        sites = tuple(site for p in self.patched for site in p.sites)
        total_in = sum(site.total_in for site in sites)
        total_out = sum(site.total_out for site in sites)
        return ToMeStats(
            requested_ratio=self.config.requested_ratio,
            effective_ratio=(1.0 - total_out / total_in) if total_in else 0.0,
            blocks_patched=sum(len(p.matchers) for p in self.patched),
            blocks_total=sum(p.blocks_total for p in self.patched),
            sites=sites,
        )

    def reset(self) -> None:
        """Forget cached matchings and statistics. Steps are counted by the pipeline's shared step
        context, which starts a new run at every ``set_timesteps`` (a bare model: when its
        timesteps turn back)."""
        for p in self.patched:
            for matcher in p.matchers:
                matcher.clear()
            for site in p.sites:
                site.calls = site.tokens_in = site.tokens_out = site.total_in = site.total_out = 0

    def remove(self) -> None:
        if self.active:
            for p in self.patched:
                unregister(p.model)
            self.active = False

    def __enter__(self) -> "ToMeHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_tome(pipe_or_model, config: ToMeConfig | None = None) -> ToMeHandle:
    """Patch every denoiser of ``pipe_or_model`` so its chosen sub-layers run on merged tokens.

    Ratio 0 is checked against the model like any config but patches nothing (no block is
    patched): the pipeline runs exactly its own code.

    Raises ``TypeError`` for an unsupported model (naming the supported ones) and ``ValueError``
    when the config cannot work on this model; nothing is patched in either case.

    Works with ``torch.compile`` (matching stays eager), model CPU offloading and diffusers' cache
    hooks. Made for inference: with gradient checkpointing, run backward after every forward, as
    the recomputation reuses the matching of the latest call.
    """
    config = config or ToMeConfig()
    models = denoisers_of(pipe_or_model)
    plans = []
    for model in models:
        if is_registered(model):
            raise RuntimeError(f"vdtome: token merging is already applied to {type(model).__name__}; remove it first")
        adapter = find_adapter(model)
        reason = adapter.shared_only(model)
        if config.matching == "per_sample" and reason:
            raise ValueError(f"vdtome: {type(model).__name__} needs matching='shared': {reason}")
        blocks = adapter.blocks(model)
        if not isinstance(config.blocks, str) and config.blocks[-1] >= len(blocks):
            raise ValueError(
                f"vdtome: block index {config.blocks[-1]} out of range; {type(model).__name__} has {len(blocks)} blocks"
            )
        if config.block_ratios and len(config.block_ratios) != len(blocks):
            raise ScheduleMismatch(f"the ratio schedule has {len(config.block_ratios)} blocks; "
                                   f"{type(model).__name__} has {len(blocks)}")
        plans.append((model, adapter, blocks))

    handle = ToMeHandle(config)
    available: set[str] = set()
    owner = models[0] if isinstance(pipe_or_model, torch.nn.Module) else pipe_or_model
    for model, adapter, blocks in plans:
        if not config.merges:
            # Ratio 0 merges nothing: install nothing, so that it costs nothing and runs the very
            # same code as the baseline (an A/A comparison).
            handle.patched.append(_Patched(model, None, [], [], len(blocks)))
            continue
        # The step context is the pipeline's, shared with every step-aware method (and by the
        # experts of Wan 2.2); each denoiser hook holds one reference, released with it.
        denoiser = DenoiserHook(adapter.read_grid, StepContext.acquire(owner))
        patched = _Patched(model, denoiser, [], [], len(blocks))
        for index, block in enumerate(blocks):
            if not config.selects_block(index) or config.ratio_of(index) == 0.0:
                continue
            sites = adapter.sites(block)
            available.update(site.target for site in sites)
            chosen = [site for site in sites if site.target in config.targets]
            if not chosen:
                continue
            matcher = BlockMatcher(index, config, denoiser, adapter.token_grid)
            patched.matchers.append(matcher)
            for site in chosen:
                stats = SiteStats(block=index, target=site.target, module=site.module)
                register(block.get_submodule(site.module), MergeSiteHook(site, matcher, stats))
                patched.sites.append(stats)
        denoiser.attach(model)
        invalidate_registry_caches(model)
        handle.patched.append(patched)
    if config.merges and not any(p.sites for p in handle.patched):
        handle.remove()
        names = ", ".join(type(m).__name__ for m in models)
        raise ValueError(
            f"vdtome: nothing to patch in {names} for targets {sorted(config.targets)} and blocks {config.blocks!r}; "
            f"available targets: {sorted(available)}"
        )
    return handle


def remove_tome(target) -> None:
    """Undo ``apply_tome``: accepts the handle, the pipeline, or a patched model."""
    if isinstance(target, ToMeHandle):
        target.remove()
        return
    for model in denoisers_of(target):
        unregister(model)
