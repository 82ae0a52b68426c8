"""Per-architecture adapters; ``find_adapter`` picks the one for a model or explains why none fits."""

from __future__ import annotations

import torch

from vdtome.core.denoisers import unwrap
from vdtome.tome.adapters import animatediff, cogvideox, hunyuan_video, ltx, mochi, wan
from vdtome.tome.adapters.base import Adapter

ADAPTERS: tuple[Adapter, ...] = (
    wan.ADAPTER,
    cogvideox.ADAPTER,
    ltx.ADAPTER,
    hunyuan_video.ADAPTER,
    mochi.ADAPTER,
    animatediff.ADAPTER,
)

SUPPORTED_MODELS: tuple[str, ...] = tuple(name for adapter in ADAPTERS for name in adapter.model_classes)


def find_adapter(model: torch.nn.Module) -> Adapter:
    model = unwrap(model)
    for adapter in ADAPTERS:
        if adapter.handles(model):
            return adapter
    raise TypeError(
        f"vdtome: token merging does not support {type(model).__name__}; supported models: {', '.join(SUPPORTED_MODELS)}"
    )


__all__ = ["ADAPTERS", "Adapter", "SUPPORTED_MODELS", "find_adapter", "unwrap"]
