"""Cancel requests that reach the process that generates.

On a ZeroGPU Space the generation function runs in a worker process forked from the app (and
reused across calls): a ``threading.Event`` set in the app's process after the fork is never seen
there. A marker file is: both processes share the file system, and the engine checks
``is_set()`` once per denoising step (one ``stat`` call).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from pathlib import Path


class CancelFlag:
    """A cancel request stored as a file, visible to every process on the host (``threading.Event``-like)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def set(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # When, written aside and renamed into place: a flag that exists always holds its time.
        pending = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
        pending.write_text(repr(time.time()))
        os.replace(pending, self.path)

    def set_at(self) -> float | None:
        """``time.time()`` of the cancel request (None if not set)."""
        try:
            return float(self.path.read_text())
        except (OSError, ValueError):
            return None

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def is_set(self) -> bool:
        return self.path.exists()


class CancelFlags:
    """Cancel flags of the runs in progress, in a private folder of this app instance: one flag per
    run (a new name each time), cleared when the run ends, so nothing piles up per visitor."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="vdtome-cancel-"))

    def new(self) -> CancelFlag:
        return CancelFlag(self.folder / uuid.uuid4().hex)
