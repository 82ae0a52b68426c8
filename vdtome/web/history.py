"""The run history a visitor's browser keeps: checked before it is trusted, appended to, capped, and
a past run found again. No Gradio import (the app turns these into its table, chart and picker)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vdtome.web.ui import (
    EARLIER_HISTORY_COLUMNS,
    HISTORY_COLUMNS,
    HISTORY_METHODS,
    VIEW_FILE,
    ComparisonView,
    run_size,
)

# The folder name of one comparison's outputs (what a history entry may point at, nothing else).
RUN_FOLDER = re.compile(r"run-[A-Za-z0-9_]+")


def checked(history: Any) -> list[dict]:
    """The history as the browser sent it, if it has the shape this page writes (else empty: an
    edited value is dropped, never trusted); one kept before the size column is moved into today's
    columns."""
    if not isinstance(history, list):
        return []
    good = [_current(entry) for entry in history if isinstance(entry, dict) and isinstance(entry.get("row"), list)
            and len(entry["row"]) in (len(HISTORY_COLUMNS), len(EARLIER_HISTORY_COLUMNS))
            and isinstance(entry.get("settings", {}), dict)
            and (entry.get("point") is None or isinstance(entry.get("point"), dict))]
    return good if len(good) == len(history) else []


def _current(entry: dict) -> dict:
    """An entry in today's columns: one of an earlier page gets its size from its settings."""
    if len(entry["row"]) == len(HISTORY_COLUMNS):
        return entry
    cells = dict(zip(EARLIER_HISTORY_COLUMNS, entry["row"]))
    settings = entry.get("settings") or {}
    height, _, width = str(settings.get("size", "")).partition("x")
    cells["size"] = run_size(settings.get("frames", "?"), height or "?", width or "?")
    point = entry.get("point")
    return entry | {"row": [cells[column] for column in HISTORY_COLUMNS],
                    "point": None if point is None else point | {"size": cells["size"]}}


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


def chart_key(entry: dict) -> str | None:
    """The runs one chart may hold share this: their model and size (None: not on the chart)."""
    point = entry.get("point")
    if not point:
        return None
    return f"{point.get('model', '?')} · {point.get('size') or 'size not recorded'}"


def chart_groups(history: list[dict]) -> list[tuple[str, str]]:
    """(label, key) of each model and size with runs on the chart, the latest run's group first."""
    keys = [key for key in map(chart_key, history) if key is not None]
    latest_first = list(dict.fromkeys(reversed(keys)))
    return [(f"{key} ({keys.count(key)} run{'s' * (keys.count(key) != 1)})", key) for key in latest_first]


def chart_runs(history: list[dict], key: str | None) -> tuple[list[dict], str | None]:
    """The runs of group ``key`` (the latest run's when None or gone) and the key used."""
    groups = [value for _, value in chart_groups(history)]
    if key not in groups:
        key = groups[0] if groups else None
    return [entry for entry in history if chart_key(entry) == key], key


def rejoined(stored: Any, current: Any, keep: int) -> list[dict]:
    """The session's history after a run, given the copy the browser keeps (``stored``). When the
    server let the session's state go while its tab stayed open (idle past the TTL, or dropped by
    the sessions cap), ``current`` starts afresh at run 1: the browser's runs come first and the new
    ones are numbered on after them, so nothing the visitor saw is lost."""
    stored, current = checked(stored), checked(current)
    if not stored or not current or current[0] == stored[0] or any(entry in stored for entry in current):
        return current  # the same history (or nothing kept in the browser)
    merged = list(stored)
    for entry in current:
        run = merged[-1]["row"][0] + 1
        point = entry.get("point")
        merged.append(entry | {"row": [run, *entry["row"][1:]],
                               "point": None if point is None else point | {"run": run}})
    return merged[-keep:]
