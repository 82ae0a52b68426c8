"""Where a pipeline keeps its denoiser(s): one answer for measurement and every method."""

from __future__ import annotations

from typing import Any

import torch

# Pipeline attributes that hold denoisers (Wan 2.2 A14B has two experts).
DENOISER_ATTRIBUTES = ("transformer", "transformer_2", "unet")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile`` wrapped, or the module itself."""
    return getattr(model, "_orig_mod", model)


def named_denoisers(pipe_or_model: Any) -> list[tuple[str, torch.nn.Module]]:
    """``(attribute, module)`` for each denoiser of a pipeline (as the pipeline calls them: compiled
    wrappers included); a bare module is its own denoiser."""
    if isinstance(pipe_or_model, torch.nn.Module):
        return [("model", pipe_or_model)]
    found = [(name, getattr(pipe_or_model, name, None)) for name in DENOISER_ATTRIBUTES]
    return [(name, module) for name, module in found if isinstance(module, torch.nn.Module)]


def denoisers_of(pipe_or_model: Any) -> list[torch.nn.Module]:
    """The denoiser modules to patch, unwrapped from ``torch.compile``; a TypeError if there is none."""
    found = named_denoisers(pipe_or_model)
    if not found:
        raise TypeError(
            f"vdtome: {type(pipe_or_model).__name__} has no denoiser ({', '.join(DENOISER_ATTRIBUTES)}) to patch"
        )
    return [unwrap(module) for _, module in found]


def denoiser_types(pipe_or_model: Any) -> tuple[type, ...]:
    """The classes of a loaded pipeline's denoisers."""
    return tuple(type(module) for module in denoisers_of(pipe_or_model))


def pipeline_denoiser_types(pipeline_class: str) -> tuple[type, ...]:
    """The denoiser classes a diffusers pipeline class is declared to take (without loading it):
    what the form asks when it marks a method unavailable for a preset."""
    import inspect
    import typing

    import diffusers

    parameters = inspect.signature(getattr(diffusers, pipeline_class).__init__).parameters
    found: list[type] = []
    for name in DENOISER_ATTRIBUTES:
        if name in parameters:
            annotation = parameters[name].annotation
            found.extend(cls for cls in (typing.get_args(annotation) or (annotation,))
                         if isinstance(cls, type) and cls is not type(None) and cls not in found)
    return tuple(found)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, in the dtypes they are stored in now."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def pipeline_weight_bytes(pipe: Any) -> int:
    """Bytes of every component's weights as the pipeline holds them now."""
    return sum(weight_bytes(c) for c in pipe.components.values() if isinstance(c, torch.nn.Module))
