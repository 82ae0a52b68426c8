"""Every use of diffusers' private API, in one place.

vdtome builds on diffusers' public hooks and caches, but a few things it must know have no public
API: which block classes the block-level caches can serve, the hook registry a module carries, a
model's cache config, MagCache's tail hook, the globally active attention backend. They are read
here only, so a diffusers release that moves them breaks one module, and its tests say which name.
Tested against diffusers 0.42.1 (requirements.txt).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

#: The attribute diffusers' ``HookRegistry.check_if_exists_or_initialize`` stores a module's registry in.
HOOK_REGISTRY_ATTRIBUTE = "_diffusers_hook"


def hook_registry(module: torch.nn.Module) -> Any | None:
    """The diffusers ``HookRegistry`` ``module`` carries, or None (never creates one)."""
    return getattr(module, HOOK_REGISTRY_ATTRIBUTE, None)


def hooks_under(model: torch.nn.Module) -> set[tuple[str, str]]:
    """(module path, hook name) of every diffusers hook under ``model``."""
    found = set()
    for path, module in model.named_modules():
        registry = hook_registry(module)
        if registry is not None:
            found.update((path, name) for name in registry.hooks)
    return found


def remove_hooks_named(root: torch.nn.Module, name: str) -> None:
    """Remove the hook ``name`` from every module under ``root`` that carries it; other hooks stay."""
    for module in root.modules():
        registry = hook_registry(module)
        if registry is not None and registry.get_hook(name) is not None:
            registry.remove_hook(name, recurse=False)


def remove_hook_at(model: torch.nn.Module, path: str, name: str) -> None:
    """Remove the hook ``name`` from the sub-module at ``path`` only (not its children)."""
    hook_registry(model.get_submodule(path)).remove_hook(name, recurse=False)


def cache_config_of(model: torch.nn.Module) -> Any | None:
    """The cache config ``CacheMixin.enable_cache`` stored on ``model`` (None: no cache)."""
    return getattr(model, "_cache_config", None)


def forget_cache_config(model: torch.nn.Module) -> None:
    """What ``CacheMixin.disable_cache`` does besides removing hooks: mark the model cache-free."""
    model._cache_config = None


def block_cache_classes() -> set[str]:
    """Names of the transformer block classes diffusers' block-level caches know how to hook."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    TransformerBlockRegistry._register()  # diffusers fills its registry lazily
    return {block.__name__ for block in TransformerBlockRegistry._registry}


def module_defines_any(cls: type, names: set[str]) -> bool:
    """Whether ``cls``'s module defines one of the classes ``names``."""
    return bool(names & set(vars(sys.modules[cls.__module__])))


def mag_cache_block_hook_name() -> str:
    """The name diffusers registers MagCache's per-block hooks under."""
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK

    return _MAG_CACHE_BLOCK_HOOK


def active_attention_backend() -> str:
    """diffusers' globally active attention backend (``attention_dispatch``), as text."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    backend = _AttentionBackendRegistry._active_backend
    return getattr(backend, "value", str(backend))


def remove_layerwise_casting(model: torch.nn.Module) -> None:
    """Take diffusers' layerwise-casting hooks off ``model`` without their ``deinitalize_hook`` (which
    refuses: casting back cannot restore lost bits; the caller puts the original weights back)."""
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

    for module in model.modules():
        registry = hook_registry(module)
        hook = None if registry is None else registry.get_hook(_LAYERWISE_CASTING_HOOK)
        if hook is not None:
            hook.deinitalize_hook = lambda module: module
            registry.remove_hook(_LAYERWISE_CASTING_HOOK, recurse=False)
    registry = hook_registry(model)
    if registry is not None:
        registry.invalidate_child_registries_cache()


def remove_group_offloading(module: torch.nn.Module) -> None:
    """Take diffusers' group-offloading hooks off ``module`` (diffusers has no public way to)."""
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAYER_EXECUTION_TRACKER,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
    )

    for sub in module.modules():  # block-level offloading may leave the top module without a registry
        registry = hook_registry(sub)
        for name in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
            if registry is not None and registry.get_hook(name) is not None:
                registry.remove_hook(name, recurse=False)
    registry = hook_registry(module)
    if registry is not None:
        registry.invalidate_child_registries_cache()


def is_group_offloaded(module: torch.nn.Module) -> bool:
    """Whether diffusers' group offloading hooks any sub-module of ``module``."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    return any(registry is not None and registry.get_hook(_GROUP_OFFLOADING) is not None
               for registry in (hook_registry(sub) for sub in module.modules()))
