"""Reversible diffusers ``ModelHook``s on chosen sub-modules, under one name per method.

A method registers its hooks with :func:`attach` and takes every one of them off with
:func:`detach`; hooks of other methods (caches, token merging, offloading) on the same modules stay.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.hooks import HookRegistry, ModelHook

from vdtome.core.diffusers_compat import hook_registry, remove_hooks_named

# The attention kernel itself, as torch hands it to a ``TorchFunctionMode`` that catches it: compared
# with ``F.scaled_dot_product_attention`` at call time, a wrapper around it (a profiler's, a test's
# spy) would let every call pass unseen.
SDPA_KERNEL = torch._C._nn.scaled_dot_product_attention
SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    """A ``scaled_dot_product_attention`` call's arguments by name, however they were passed."""
    return dict(zip(SDPA_PARAMETERS, args)) | kwargs


def attach(modules: Iterable[torch.nn.Module], make_hook, name: str, roots: Iterable[torch.nn.Module]) -> list:
    """``make_hook(module)`` registered on each module as ``name``; returns the hooks. ``roots``: the
    models the modules belong to (diffusers caches which of their sub-modules carry hooks)."""
    hooks = []
    try:
        for module in modules:
            hook: ModelHook = make_hook(module)
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
            hooks.append(hook)
    except BaseException:
        detach(roots, name)
        raise
    _invalidate(roots)
    return hooks


def detach(roots: Iterable[torch.nn.Module], name: str) -> None:
    """Remove every hook called ``name`` under ``roots``."""
    roots = list(roots)
    for root in roots:
        remove_hooks_named(root, name)
    _invalidate(roots)


def _invalidate(roots: Iterable[torch.nn.Module]) -> None:
    for root in roots:
        registry = hook_registry(root)
        if registry is not None:
            registry.invalidate_child_registries_cache()
