"""The run history a visitor's browser keeps: checked before it is trusted, appended to, capped, and
a past run found again. No Gradio import (the app turns these into its table, chart and picker)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vdtome.web.ui import HISTORY_COLUMNS, HISTORY_METHODS, VIEW_FILE, ComparisonView

# The folder name of one comparison's outputs (what a history entry may point at, nothing else).
RUN_FOLDER = re.compile(r"run-[A-Za-z0-9_]+")


def checked(history: Any) -> list[dict]:
    """The history as the browser sent it, if it has the shape this page writes (else empty: an old
    or edited value is dropped, never trusted)."""
    if not isinstance(history, list):
        return []
    good = [entry for entry in history if isinstance(entry, dict) and isinstance(entry.get("row"), list)
            and len(entry["row"]) == len(HISTORY_COLUMNS) and isinstance(entry.get("settings", {}), dict)
            and (entry.get("point") is None or isinstance(entry.get("point"), dict))]
    return good if len(good) == len(history) else []


def record(history: Any, views: list[ComparisonView], keep: int, series: str | None = None) -> list[dict]:
    """History with the new runs appended (numbered on), the oldest dropped beyond ``keep`` rows.
    ``series``: what the runs of one sweep share (shown beside each)."""
    history = checked(history)
    first = history[-1]["row"][0] + 1 if history else 1
    series = f"sweep from run {first}: {series}" if series else None
    for view in views:
        if view.history is not None:
            run = history[-1]["row"][0] + 1 if history else 1
            entry = dict(view.history, series=series, folder=Path(view.files["json"]).parent.name)
            entry["row"] = [run, *entry["row"][1:]]
            entry["point"] = None if entry["point"] is None else dict(entry["point"], run=run)
            history.append(entry)
    return history[-keep:]


def run_choices(history: list[dict]) -> list[tuple[str, int]]:
    """(label, run number) of every run whose files may still be on disk, for the run picker."""
    return [(f"run {entry['row'][0]}: {entry['row'][HISTORY_METHODS]}"
             + (f" ({entry['series']})" if entry.get("series") else ""), entry["row"][0])
            for entry in history if entry.get("folder")]


def run_folder(history: Any, run: Any, output_root: Path) -> Path | None:
    """The folder of ``run``'s outputs under ``output_root``, if the history names one this server
    could have written (never a path the browser made up) and its saved view is still there."""
    entry = next((e for e in checked(history) if e["row"][0] == run), None)
    folder = None if entry is None else entry.get("folder")
    if not (isinstance(folder, str) and RUN_FOLDER.fullmatch(folder)):
        return None
    path = output_root / folder
    return path if (path / VIEW_FILE).exists() else None
