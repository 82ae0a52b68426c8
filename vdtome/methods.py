"""Acceleration methods the comparison engine knows: config type -> how to apply and describe it.

A method is a frozen config dataclass plus an ``apply`` function returning something with
``remove()`` (undo exactly) and ``report()`` (JSON-safe statistics). New methods (step caches,
sparse attention, slicing) register here; ``compare`` never needs to know their internals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .tome import ToMeConfig, apply_tome


class AppliedMethod(Protocol):
    def remove(self) -> None: ...

    def reset(self) -> None: ...  # forget statistics and state (e.g. after a warm-up call)

    def report(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Method:
    """``touches``: the phases the method can change (the others are shown as unchanged and
    double as a noise check); ``steps_alike``: whether every denoising step of a config costs the
    same, so that single steps may serve as repeats of the timing protocol."""

    name: str
    label: str
    apply: Callable[[Any, Any], AppliedMethod]
    touches: frozenset[str] = frozenset({"denoising"})
    steps_alike: Callable[[Any], bool] = lambda config: False


class _AppliedToMe:
    def __init__(self, pipe, config: ToMeConfig) -> None:
        self.handle = apply_tome(pipe, config)

    def remove(self) -> None:
        self.handle.remove()

    def reset(self) -> None:
        self.handle.reset()

    def report(self) -> dict[str, Any]:
        stats = self.handle.stats().as_dict()
        sites = stats.pop("sites")
        stats["tokens_per_block"] = [
            {key: site[key] for key in ("block", "target", "module", "calls", "tokens_in", "tokens_out")}
            for site in sites
        ]
        return stats


METHODS: dict[type, Method] = {
    # With reuse_steps > 1 some steps compute a matching and others reuse it: steps differ.
    ToMeConfig: Method("tome", "token merging (ToMe)", _AppliedToMe, steps_alike=lambda c: c.reuse_steps == 1),
}


def method_of(config: Any) -> Method:
    try:
        return METHODS[type(config)]
    except KeyError:
        known = ", ".join(cls.__name__ for cls in METHODS)
        raise TypeError(f"unknown acceleration config {type(config).__name__}; known: {known}") from None


def apply_method(pipe, config: Any) -> AppliedMethod:
    return method_of(config).apply(pipe, config)


def describe(config: Any) -> dict[str, Any]:
    """JSON-safe description of a method config (name + every field)."""
    fields = {
        key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(config).items()
    }
    return {"method": method_of(config).name, **fields}
