"""Token merging (ToMe) for video diffusion transformers, applied through reversible hooks.

Names load on first use: the config and the adapters' model list (what the method's declaration
reads) import no diffusers; the hooks do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vdtome.core.lazy import lazy_exports

# Public name -> the module that defines it.
_EXPORTS = {
    "SUPPORTED_MODELS": "vdtome.tome.adapters",
    "ToMeHandle": "vdtome.tome.apply",
    "ToMeStats": "vdtome.tome.apply",
    "apply_tome": "vdtome.tome.apply",
    "remove_tome": "vdtome.tome.apply",
    "ToMeConfig": "vdtome.tome.config",
    "SiteStats": "vdtome.tome.sites",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names above load on first use
    from vdtome.tome.adapters import SUPPORTED_MODELS
    from vdtome.tome.apply import ToMeHandle, ToMeStats, apply_tome, remove_tome
    from vdtome.tome.config import ToMeConfig
    from vdtome.tome.sites import SiteStats
