"""Disk a long-running app may use: one private folder per app instance, pruned by count and size.

Two app instances on one host (two ports, a restart while the old process drains) must not prune
or serve each other's files, so every instance works under a folder of its own, removed at exit.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def entry_bytes(path: Path) -> int:
    """Bytes under ``path`` (a file or a folder; files that vanish meanwhile count as 0)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for item in path.rglob("*"):
        try:
            if item.is_file():
                total += item.stat().st_size
        except OSError:
            pass
    return total


def prune(root: Path, keep: int, max_bytes: int) -> list[Path]:
    """Delete the oldest entries of ``root`` until at most ``keep`` remain and they hold at most
    ``max_bytes``; returns what was deleted. The newest entry is always kept."""
    if not root.is_dir():
        return []
    entries = []
    for path in root.iterdir():
        try:
            entries.append((path.stat().st_mtime, path))
        except OSError:  # deleted by a concurrent prune
            pass
    entries.sort()
    sizes = [entry_bytes(path) for _, path in entries]
    total = sum(sizes)
    removed = []
    for index, (_, path) in enumerate(entries[:-1]):
        if len(entries) - index <= keep and total <= max_bytes:
            break
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        total -= sizes[index]
        removed.append(path)
    return removed


def instance_folder(base: str | Path | None = None, prefix: str = "vdtome-") -> Path:
    """A new private folder for this process under ``base`` (the system temp folder by default),
    deleted when the process exits normally."""
    if base is not None:
        Path(base).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    atexit.register(shutil.rmtree, folder, True)
    return folder
