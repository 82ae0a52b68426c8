"""Stacks of methods: checked against the stacking rules, applied in order, undone in reverse.

The rules (each refusal names it, before anything runs):
* a method appears at most once in a stack;
* a method that moves the weights as the others leave them (offloading) comes last;
* diffusers keeps one cache per model: two diffusers caches cannot stack;
* a cache that reuses attention outputs across steps cannot stack with a method whose token
  layout changes between steps (token merging at ratio > 0): a stored output of one step's merged
  tokens would be unmerged with another step's matching;
* a cache that wraps the denoiser's whole forward (cache-dit) stacks with no other step cache;
* a cache that decides from its first blocks' residual (cache-dit's Fn blocks) cannot stack with a
  method that changes those blocks (token merging in them): their residual would change more than
  any threshold at every step, and it would cache nothing;
* a compile that allows no graph break (fullgraph) cannot stack with a method known to break it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vdtome.core.denoisers import DenoiserType, denoiser_types
from vdtome.core.validation import RequestError
from vdtome.methods.base import REUSES_ATTENTION, Applied, CallPlan, Method, MethodReport
from vdtome.methods.registry import METHODS, method_of


def check_stack(configs: Sequence[Any]) -> tuple[Method, ...]:
    """The stack's methods, or a :class:`RequestError` naming the broken rule."""
    methods = tuple(method_of(config) for config in configs)
    seen: set[str] = set()
    for method in methods:
        if method.name in seen:
            raise RequestError(f"{method.label} appears twice in the stack; a method can be applied once",
                               method.enable_field)
        seen.add(method.name)
    for method in methods[:-1]:
        if method.applies_last:
            raise RequestError(f"{method.label} must come last in the stack: it moves the weights as the methods "
                               f"before it leave them (after {methods[-1].label}, it would move the weights that "
                               "method replaces)", method.enable_field)
    caches = [m for m in methods if m.diffusers_cache]
    if len(caches) > 1:
        raise RequestError(f"{caches[0].label} and {caches[1].label} cannot stack: diffusers keeps one cache per "
                           "model; choose one step cache", caches[1].enable_field)
    for cache, config in zip(methods, configs):
        if cache.reuses_across_steps != REUSES_ATTENTION:
            continue
        for other, other_config in zip(methods, configs):
            if other.matching_varies(other_config):
                raise RequestError(
                    f"{cache.label} cannot stack with {other.label}: it reuses attention outputs across steps, "
                    f"while {other.label} changes its token matching between steps (a stored output would be "
                    f"restored with another step's matching); stack {other.label} with a block-level cache "
                    f"({', '.join(_block_level_caches())}) instead", cache.enable_field)
    for wrapper in (m for m in methods if m.wraps_denoiser):
        other = next((m for m in methods if m is not wrapper and m.reuses_across_steps), None)
        if other is not None:
            raise RequestError(f"{wrapper.label} cannot stack with {other.label}: it skips work by wrapping the "
                               "denoiser's whole forward, so both would decide what to skip; choose one step cache",
                               wrapper.enable_field)
    for cache, config in zip(methods, configs):
        first = cache.measures_first_blocks(config) if cache.measures_first_blocks else 0
        for other, other_config in zip(methods, configs):
            altered = [i for i in range(first) if other.alters_block and other.alters_block(other_config, i)]
            if altered:
                raise RequestError(
                    f"{other.label} changes block {altered[0]}, one of the first {first} whose residual "
                    f"{cache.label} measures to decide what to skip: that residual would change more than its "
                    f"threshold at every step and nothing would be cached; keep {other.label} off those blocks (a "
                    "per-block schedule with 0 there) or let the cache measure fewer", other.enable_field)
    for strict, config in zip(methods, configs):
        if strict.refuses_graph_breaks is None or not strict.refuses_graph_breaks(config):
            continue
        breaking = next((m for m in methods if m.graph_breaks), None)
        if breaking is not None:
            raise RequestError(f"{strict.label} with full graph cannot stack with {breaking.label}: it breaks the "
                               f"compiled graph ({breaking.graph_breaks}); turn full graph off to compile the parts "
                               "between the breaks", strict.enable_field)
    return methods


def steps_alike(configs: Sequence[Any]) -> bool:
    """Every denoising step of the stack costs the same: the timing protocol may time short rounds
    (:mod:`vdtome.measure.protocol`); otherwise every round runs whole calls."""
    return all(method_of(config).steps_alike(config) for config in configs)


def _block_level_caches() -> list[str]:
    return [m.label for m in METHODS.values() if m.diffusers_cache and m.reuses_across_steps != REUSES_ATTENTION]


def check_available(methods: Sequence[Method], denoiser_types: tuple[DenoiserType, ...]) -> None:
    for method in methods:
        reason = method.unavailable(denoiser_types)
        if reason:
            raise RequestError(f"{method.label} is unavailable for this model: {reason}", method.enable_field)


class AppliedStack:
    """Every method of a stack applied to one pipeline, in order; ``remove`` undoes them in reverse.

    The stacking rules and every method's availability for the pipeline's denoisers are checked
    first; if one method fails to apply, the ones before it are removed before the error
    propagates: the pipeline is left exactly as it was.
    """

    def __init__(self, pipe: Any, configs: Sequence[Any]) -> None:
        self.methods = check_stack(configs)
        check_available(self.methods, denoiser_types(pipe))
        self.configs = tuple(configs)
        self.recipe = None  # the recipe it came from (vdtome.apply), if any
        self.applied: list[Applied] = []
        try:
            for method, config in zip(self.methods, self.configs):
                self.applied.append(method.apply(pipe, config))
        except BaseException:
            self.remove()
            raise

    def reset(self) -> None:
        for applied in self.applied:
            applied.reset()

    def remove(self) -> None:
        while self.applied:
            self.applied.pop().remove()

    def reports(self) -> tuple[MethodReport, ...]:
        return tuple(applied.report() for applied in self.applied)

    def __enter__(self) -> "AppliedStack":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def prepare_stack(pipe: Any, configs: Sequence[Any], call: CallPlan, run_untimed: Callable[[], None]) -> tuple[Any, ...]:
    """The configs for calls of ``call``: a method with a ``prepare`` fills its own in (MagCache
    calibrates its magnitude ratios in one plain run, ``run_untimed()``, at these settings)."""
    return tuple(method_of(config).prepare(pipe, config, call, run_untimed) if method_of(config).prepare else config
                 for config in configs)


def apply_stack(pipe: Any, configs: Sequence[Any]) -> AppliedStack:
    return AppliedStack(pipe, configs)


def stack_label(configs: Sequence[Any]) -> str:
    """"tome ratio 0.5 stride 1x2x2 + first_block_cache threshold 0.2" (or "none")."""
    if not configs:
        return "none"
    return " + ".join(f"{method_of(c).name} {method_of(c).summary(c)}".strip() for c in configs)
