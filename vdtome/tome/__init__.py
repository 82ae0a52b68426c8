"""Token merging (ToMe) for video diffusion transformers, applied through reversible hooks."""

from vdtome.tome.adapters import SUPPORTED_MODELS
from vdtome.tome.apply import ToMeHandle, ToMeStats, apply_tome, remove_tome
from vdtome.tome.config import ToMeConfig
from vdtome.tome.hooks import SiteStats

__all__ = ["SUPPORTED_MODELS", "SiteStats", "ToMeConfig", "ToMeHandle", "ToMeStats", "apply_tome", "remove_tome"]
