"""Per-layer schedules (a tile pattern per self-attention layer, a merge ratio per block): JSON
files written by ``python -m vdtome search`` and read by the methods' ``schedule`` fields.

A field's value is a shipped schedule's name (``tiny-wan``: ``vdtome/data/schedules/tiny-wan.<method>.json``)
or a path. A schedule records what it was searched on (preset, size, steps, prompts, threshold),
each layer's error figures, and the hash of the check run it was verified with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vdtome.core.validation import RequestError

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "schedules"
FORMAT = 1


def shipped_schedules(method: str) -> tuple[str, ...]:
    """The names of the schedules shipped for ``method`` (one per preset searched)."""
    suffix = f".{method}.json"
    return tuple(sorted(p.name[:-len(suffix)] for p in SHIPPED.glob(f"*{suffix}")))


def schedule_path(text: str, method: str) -> Path:
    shipped = SHIPPED / f"{text}.{method}.json"
    return shipped if "/" not in text and shipped.is_file() else Path(text).expanduser()


def read_schedule(text: str, method: str, field: str, key: str) -> dict[str, Any]:
    """The schedule ``text`` names, checked: a JSON object written for ``method`` whose ``key``
    holds one entry per layer. Errors name ``field`` and the rule."""
    path = schedule_path(text, method)
    names = ", ".join(shipped_schedules(method)) or "none"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RequestError(f"schedule {text!r} is neither a shipped schedule ({names}) nor a file", field) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(f"schedule {text!r} could not be read as JSON: {error}", field) from None
    if not isinstance(data, dict) or data.get("method") != method:
        raise RequestError(f"schedule {text!r} is not a {method} schedule (its \"method\" is "
                           f"{data.get('method') if isinstance(data, dict) else None!r})", field)
    entries = data.get(key)
    if not isinstance(entries, list) or not entries:
        raise RequestError(f"schedule {text!r} has no list of per-layer values under {key!r}", field)
    return data


def write_schedule(path: str | Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": FORMAT, **data}, indent=1) + "\n")
    return path
