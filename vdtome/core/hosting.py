"""Where this process serves from, as far as a method's availability depends on it."""

from __future__ import annotations

import os
import sys


def on_zero_gpu() -> bool:
    """A ZeroGPU Space, not merely the `spaces` package installed (its GPU decorator is then a no-op):
    its config when the app imported `spaces` (it must, before torch), else the variable it sets."""
    spaces = sys.modules.get("spaces")
    config = getattr(getattr(spaces, "config", None), "Config", None)
    if config is not None and hasattr(config, "zero_gpu"):
        return bool(config.zero_gpu)
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")
