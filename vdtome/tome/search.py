"""A merge ratio per block: the probe behind ``python -m vdtome search --method tome``.

During the calibration calls every patched sub-layer runs as it is (the trajectory stays the
baseline's) and, beside it on the same inputs, once per candidate ratio through the very hook a
run uses (:meth:`vdtome.tome.hooks.MergeSiteHook.merged_forward`, with the matching a run at that
ratio draws for that block and step). Each block keeps, per ratio, the largest relative error (L2)
of its sub-layers' outputs (mean and largest over the calls); :meth:`RatioSearch.choose` gives each
block the largest ratio whose mean error is within the threshold (0: the block is left alone).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from vdtome.core.calibration import ErrorTally
from vdtome.core.denoisers import denoisers_of, unwrap
from vdtome.core.diffusers_compat import remove_hooks_named
from vdtome.core.steps import StepContext
from vdtome.tome.adapters import find_adapter
from vdtome.tome.config import ToMeConfig
from vdtome.tome.hooks import BlockMatcher, DenoiserHook, MergeSiteHook, invalidate_registry_caches
from vdtome.tome.sites import MergeSite, SiteStats

HOOK = "vdtome_ratio_search"
CANDIDATE_STEP = 0.1


def candidate_ratios(config: ToMeConfig) -> tuple[float, ...]:
    """0.1, 0.2, ... up to the stride's cap."""
    count = int(config.max_ratio / CANDIDATE_STEP + 1e-9)
    return tuple(round(CANDIDATE_STEP * (i + 1), 2) for i in range(count))


class _SiteProbe(ModelHook):
    def __init__(self, site: MergeSite, candidates: list[tuple[float, MergeSiteHook]], errors: ErrorTally):
        super().__init__()
        self.site = site
        self.candidates = candidates
        self.errors = errors

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        for _, candidate in self.candidates:
            candidate.initialize_hook(module)
        return module

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        dense = forward(*args, **kwargs)
        for ratio, candidate in self.candidates:
            self.errors.add(ratio, self._tokens(candidate.merged_forward(module, forward, args, kwargs)),
                            self._tokens(dense))
        return dense

    def _tokens(self, output: Any) -> torch.Tensor:
        return output if self.site.output_index is None else output[self.site.output_index]


class RatioSearch:
    def __init__(self, pipe: Any, config: ToMeConfig) -> None:
        self.config = config
        self.ratios = candidate_ratios(config)
        self.models = denoisers_of(pipe)
        owner = self.models[0] if isinstance(pipe, torch.nn.Module) else pipe
        self.errors: list[ErrorTally] = []
        self.denoisers: list[DenoiserHook] = []
        try:
            for model in self.models:
                adapter = find_adapter(model)
                denoiser = DenoiserHook(adapter.read_grid, StepContext.acquire(owner))
                self.denoisers.append(denoiser)
                for index, block in enumerate(adapter.blocks(unwrap(model))):
                    if index == len(self.errors):
                        self.errors.append(ErrorTally())
                    errors = self.errors[index]
                    matchers = [(ratio, BlockMatcher(index, dataclasses.replace(config, ratio=ratio, block_ratios=()),
                                                     denoiser, adapter.token_grid)) for ratio in self.ratios]
                    for site in adapter.sites(block):
                        if site.target not in config.targets:
                            continue
                        candidates = [(ratio, MergeSiteHook(site, matcher, SiteStats(index, site.target, site.module)))
                                      for ratio, matcher in matchers]
                        registry = HookRegistry.check_if_exists_or_initialize(block.get_submodule(site.module))
                        registry.register_hook(_SiteProbe(site, candidates, errors), HOOK)
                denoiser.attach(model)
                invalidate_registry_caches(model)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for model in self.models:
            remove_hooks_named(model, HOOK)
            invalidate_registry_caches(model)
        for denoiser in self.denoisers:
            if denoiser.attached:
                denoiser.detach()
            denoiser.context.release()
        self.denoisers = []

    def choose(self, threshold: float) -> dict[str, Any]:
        if not any(self.errors):
            raise ValueError("the calibration calls ran no patched sub-layer")
        ratios = [max(block.within(threshold), default=0.0) for block in self.errors]
        errors = [block.figures(lambda ratio: f"{ratio:g}") for block in self.errors]
        return {"stride": list(self.config.stride), "ratios": ratios, "errors": errors}
