"""Known-harmless messages of the libraries below vdtome, silenced one exact message at a time
(never a blanket filter), each with the reason it is harmless here.

Installed when ``vdtome`` is imported, before anything imports diffusers, so the command line, the
app and library users see the messages that matter, not these on every run.
"""

from __future__ import annotations

import logging
import re

# diffusers imports transformers' CLIPImageProcessor (AnimateDiff, IP adapters) and
# SiglipImageProcessor (IP adapters) at import time; without torchvision (not a dependency),
# transformers 5 serves their PIL versions and warns once each. vdtome never passes images to them.
TORCHVISION_FALLBACK = re.compile(
    r"`(CLIPImageProcessor|SiglipImageProcessor)` requires torchvision \(not installed\); falling back to `\1Pil` ")
TORCHVISION_FALLBACK_LOGGER = "transformers.utils.import_utils"


class DropMessage(logging.Filter):
    """Drops the records of one logger whose message matches ``pattern`` (from its start)."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def silence_known_messages() -> None:
    """Install the filters (once: calling again adds none)."""
    logger = logging.getLogger(TORCHVISION_FALLBACK_LOGGER)
    if not any(isinstance(f, DropMessage) and f.pattern is TORCHVISION_FALLBACK for f in logger.filters):
        logger.addFilter(DropMessage(TORCHVISION_FALLBACK))
