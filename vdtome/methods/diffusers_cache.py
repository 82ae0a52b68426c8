"""Step caches that diffusers ships as hooks, applied through the model's own ``enable_cache``.

Nothing is re-implemented: each cache module of this package names its diffusers config, its
form fields and how to build the config; this module applies it to every denoiser (diffusers'
``CacheMixin.enable_cache``), resets its state between generations (``_reset_stateful_cache``),
removes it (``disable_cache``) and reports the computations a :class:`ComputeSpy` saw skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vdtome.core.denoisers import DenoiserType, denoiser_types, denoisers_of
from vdtome.core.diffusers_compat import cache_config_of, forget_cache_config, hooks_under, remove_hook_at
from vdtome.methods.base import FormField, Method, MethodReport
from vdtome.methods.evidence import ComputeSpy


def host_timestep(pipe: Any) -> Callable[[], float | None]:
    """diffusers' ``current_timestep_callback`` from the pipeline's step context: a Python number,
    so comparing it with a timestep range costs no host sync per attention call (the pipeline's
    own ``current_timestep`` is a device tensor)."""
    # Imported where used (here and in AppliedCache): defining StepContext's compiler-disabled hook
    # loads torch's compiler, about a second that declaring a cache method must not wait for.
    from vdtome.core.steps import StepContext

    return StepContext.of(pipe).current_timestep


def cache_unavailable(denoiser_types: tuple[DenoiserType, ...]) -> str | None:
    """Why no diffusers cache can serve these denoiser types (None: one can)."""
    if any(denoiser.enable_cache for denoiser in denoiser_types):
        return None
    names = " or ".join(denoiser.name for denoiser in denoiser_types)
    return f"diffusers' caches attach only to models with enable_cache (a CacheMixin), and {names} has no enable_cache"


def first_refusal(denoiser_types: tuple[DenoiserType, ...],
                  general: Callable[[tuple[DenoiserType, ...]], str | None],
                  refuses: Callable[[DenoiserType], str | None]) -> str | None:
    """``general``'s reason, else the reason ``refuses`` gives for the first type it refuses
    (a cache's own limits on top of what every cache needs)."""
    return general(denoiser_types) or next(filter(None, map(refuses, denoiser_types)), None)


def block_cache_unavailable(denoiser_types: tuple[DenoiserType, ...]) -> str | None:
    """Why a block-level diffusers cache cannot serve these types: it must know where a block
    takes and returns its hidden states, which diffusers' ``TransformerBlockRegistry`` records per
    block class (:attr:`DenoiserType.block_cache`)."""

    def refuses(denoiser: DenoiserType) -> str | None:
        if denoiser.block_cache:
            return None
        return (f"diffusers' TransformerBlockRegistry knows no transformer block of {denoiser.name}, so its "
                "block-level caches cannot tell where a block's hidden states go in and come out")

    return first_refusal(denoiser_types, cache_unavailable, refuses)


def cache_method(name: str, label: str, config_type: type, fields: tuple[FormField, ...],
                 parse: Callable[[Any], Any], summary: Callable[[Any], str], build: Callable[[Any, Any, Any], Any],
                 *, reuses: str, docs: str,
                 unavailable: Callable[[tuple[DenoiserType, ...]], str | None] = cache_unavailable,
                 **extra: Any) -> Method:
    """The :class:`Method` of a diffusers cache: applied by :class:`AppliedCache` with ``build``
    (config, pipe, denoiser -> diffusers config) unless ``extra`` names another ``apply``."""
    extra.setdefault("apply", lambda pipe, config: AppliedCache(pipe, config, name, build, summary))
    return Method(name=name, label=label, config_type=config_type, fields=fields, parse=parse, summary=summary,
                  unavailable=unavailable, reuses_across_steps=reuses, diffusers_cache=True, docs=docs, **extra)


class AppliedCache:
    """A diffusers cache on every denoiser of a pipeline, with a spy counting what it skipped."""

    def __init__(self, pipe: Any, config: Any, name: str, build: Callable[[Any, Any, torch.nn.Module], Any],
                 summary: Callable[[Any], str]) -> None:
        from vdtome.core.steps import StepContext

        self.config, self.name, self.summary = config, name, summary
        self.models: list[torch.nn.Module] = []
        reason = cache_unavailable(denoiser_types(pipe))
        if reason:
            raise ValueError(f"vdtome: {name}: {reason}")
        # The pipeline's step context: ``build`` may hand its host-side timestep to diffusers.
        self.context: StepContext | None = StepContext.acquire(pipe)
        try:
            for model in denoisers_of(pipe):
                if model.is_cache_enabled:
                    raise ValueError(f"vdtome: {type(model).__name__} already has a diffusers cache "
                                     f"({type(cache_config_of(model)).__name__}); diffusers keeps one per model")
                before = hooks_under(model)
                try:
                    model.enable_cache(build(config, pipe, model))
                except BaseException:
                    _remove_new_hooks(model, before)  # what a half-done enable_cache left
                    raise
                self.models.append(model)
                if hooks_under(model) == before:  # e.g. no attention module matched its identifiers
                    raise ValueError(f"vdtome: {name}: diffusers found nothing to cache in {type(model).__name__}")
        except BaseException:
            self.remove()
            raise
        self.spy = ComputeSpy(self.models)

    def reset(self) -> None:
        for model in self.models:
            model._reset_stateful_cache()
        self.spy.reset()

    def remove(self) -> None:
        for model in self.models:
            model.disable_cache()
        self.models = []
        if self.context is not None:
            self.context.release()
            self.context = None
        spy = getattr(self, "spy", None)
        if spy is not None:
            spy.remove()

    def report(self) -> MethodReport:
        evidence = self.spy.evidence()
        return MethodReport(
            method=self.name,
            summary={"settings": self.summary(self.config),
                     "blocks skipped": _share(self.spy.blocks_skipped, self.spy.expected_blocks),
                     "attention skipped": _share(self.spy.attention_skipped, self.spy.expected_attention)},
            detail={"expected_block_computations": self.spy.expected_blocks,
                    "block_computations": self.spy.blocks_run,
                    "expected_attention_computations": self.spy.expected_attention,
                    "attention_computations": self.spy.attention_run},
            evidence=evidence,
        )


def _share(part: int, whole: int) -> float:
    return round(part / whole, 3) if whole else 0.0


def _remove_new_hooks(model: torch.nn.Module, before: set[tuple[str, str]]) -> None:
    for path, name in sorted(hooks_under(model) - before, reverse=True):
        remove_hook_at(model, path, name)
    forget_cache_config(model)
