"""Token merging (ToMe) for video diffusion transformers, applied through reversible hooks."""

from .adapters import SUPPORTED_MODELS
from .apply import ToMeHandle, ToMeStats, apply_tome, remove_tome
from .config import ToMeConfig
from .hooks import SiteStats

__all__ = ["SUPPORTED_MODELS", "SiteStats", "ToMeConfig", "ToMeHandle", "ToMeStats", "apply_tome", "remove_tome"]
