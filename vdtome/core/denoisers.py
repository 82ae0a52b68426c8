"""Where a pipeline keeps its denoiser(s): one answer for measurement and every method.

Also what the methods' availability rules read of a denoiser class (:class:`DenoiserType`), and
those facts for the pipeline classes of the shipped presets in a table, so that listing which
presets a method serves (``python -m vdtome methods``) needs no diffusers import; a test checks
the table against diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Pipeline attributes that hold denoisers (Wan 2.2 A14B has two experts).
DENOISER_ATTRIBUTES = ("transformer", "transformer_2", "unet")


@dataclass(frozen=True)
class DenoiserType:
    """A denoiser class as the methods' availability rules read it (``Method.unavailable``).

    ``name``: the class name; ``enable_cache``: it has diffusers' ``enable_cache`` (a
    ``CacheMixin``), which every diffusers cache attaches through; ``block_cache``: diffusers'
    block-level caches know one of its block classes (``TransformerBlockRegistry``).
    """

    name: str
    enable_cache: bool
    block_cache: bool

    @classmethod
    def of(cls, model_class: type) -> DenoiserType:
        """The facts of a real diffusers (or custom) model class, read from diffusers."""
        from diffusers.models.cache_utils import CacheMixin

        from vdtome.core.diffusers_compat import block_cache_classes, module_defines_any

        return cls(model_class.__name__, issubclass(model_class, CacheMixin),
                   module_defines_any(model_class, block_cache_classes()))


# The denoisers each shipped preset's pipeline class declares (``declared_denoiser_types`` reads
# the same from diffusers; tests/test_presets.py checks that they agree for every entry).
PIPELINE_DENOISERS: dict[str, tuple[DenoiserType, ...]] = {
    "WanPipeline": (DenoiserType("WanTransformer3DModel", enable_cache=True, block_cache=True),),
    "CogVideoXPipeline": (DenoiserType("CogVideoXTransformer3DModel", enable_cache=True, block_cache=True),),
    "LTXPipeline": (DenoiserType("LTXVideoTransformer3DModel", enable_cache=True, block_cache=True),),
    "HunyuanVideoPipeline": (DenoiserType("HunyuanVideoTransformer3DModel", enable_cache=True, block_cache=True),),
    "AnimateDiffPipeline": (DenoiserType("UNet2DConditionModel", enable_cache=False, block_cache=False),
                            DenoiserType("UNetMotionModel", enable_cache=False, block_cache=True)),
}


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


def denoiser_types(pipe_or_model: Any) -> tuple[DenoiserType, ...]:
    """The types of a loaded pipeline's denoisers, as the availability rules read them."""
    return tuple(DenoiserType.of(type(module)) for module in denoisers_of(pipe_or_model))


def pipeline_denoiser_types(pipeline_class: str) -> tuple[DenoiserType, ...]:
    """The denoiser types a diffusers pipeline class is declared to take (without loading it):
    what the form and ``python -m vdtome methods`` ask when they mark a method unavailable for a
    preset. From :data:`PIPELINE_DENOISERS` when listed there (no diffusers import), else read
    from diffusers."""
    known = PIPELINE_DENOISERS.get(pipeline_class)
    return known if known is not None else declared_denoiser_types(pipeline_class)


def declared_denoiser_types(pipeline_class: str) -> tuple[DenoiserType, ...]:
    """The denoiser types read from the annotations of the diffusers pipeline class's ``__init__``."""
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
    return tuple(DenoiserType.of(cls) for cls in found)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, in the dtypes they are stored in now."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def pipeline_weight_bytes(pipe: Any) -> int:
    """Bytes of every component's weights as the pipeline holds them now."""
    return sum(weight_bytes(c) for c in pipe.components.values() if isinstance(c, torch.nn.Module))
