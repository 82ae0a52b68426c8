"""A/A noise per host and preset: how far two identical calls differ, kept across requests.

The steps of one call share that call's conditions (memory placement, clocks, caches, what else
ran), so they say nothing about how much a *call* varies; only repeated calls do. Every request
already makes repeated identical calls: consecutive calls of one side (baseline after baseline,
accelerated after accelerated) compute the same thing, so their time ratios are A/A measurements
of the between-call noise, free of charge. :class:`NoiseStore` keeps them per host and per
(preset, video size, steps, statistic) in one JSON file per host, newest :data:`KEPT_PAIRS`, so
the noise threshold of a verdict (:func:`vdtome.measure.stats.aa_threshold`) is measured on the machine
and the model it judges, and grows more precise with every request.

Writes are atomic (a temporary file renamed over the old one); two processes writing at once may
lose each other's newest pairs, never corrupt the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import socket
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vdtome.measure.stats import MIN_AA_PAIRS, NOISE_THRESHOLD, aa_threshold

#: A/A log ratios kept per key (the newest): enough for a stable 95 % quantile, small on disk.
KEPT_PAIRS = 400
NOISE_DIR_ENV = "VDTOME_NOISE_DIR"


def default_noise_dir() -> Path:
    """``$VDTOME_NOISE_DIR``, else ``$XDG_CACHE_HOME/vdtome/noise`` (``~/.cache/vdtome/noise``)."""
    if os.environ.get(NOISE_DIR_ENV):
        return Path(os.environ[NOISE_DIR_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "vdtome" / "noise"


def host_description(env: dict[str, Any]) -> dict[str, Any]:
    """What makes two hosts time differently: machine, processor, cores and threads, device."""
    return {
        "host": socket.gethostname(),
        "machine": platform.machine(),
        "cpu": env.get("cpu"),
        "cpu_count": env.get("cpu_count"),
        "cpu_affinity": env.get("cpu_affinity"),
        "torch_num_threads": env.get("torch_num_threads"),
        "device_name": env.get("device_name"),
    }


@dataclass(frozen=True)
class NoiseThreshold:
    """The noise threshold of a verdict over ``rounds`` pairs, and what it rests on.

    ``threshold``: a change of the median below this fraction is noise; ``aa_pairs``: A/A pairs it
    was measured from (this request's and earlier ones on this host); ``measured``: False when too
    few pairs exist and the default :data:`~vdtome.measure.stats.NOISE_THRESHOLD` is used; ``single_pair``:
    how far one A/A pair strays (95 %), the between-call spread a one-pair request would carry.
    """

    threshold: float
    aa_pairs: int
    measured: bool
    single_pair: float | None = None

    @property
    def source(self) -> str:
        if self.measured:
            return f"from {self.aa_pairs} A/A pairs of identical calls on this host"
        return f"default: {self.aa_pairs} of {MIN_AA_PAIRS} A/A pairs measured on this host so far"

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "aa_pairs": self.aa_pairs, "measured": self.measured,
                "single_pair_spread": self.single_pair, "source": self.source}

    @classmethod
    def from_pairs(cls, log_ratios: Sequence[float], rounds: int) -> "NoiseThreshold":
        measured = aa_threshold(log_ratios, max(rounds, 1))
        single = aa_threshold(log_ratios, 1)
        if measured is None:
            return cls(NOISE_THRESHOLD, len(log_ratios), False, single)
        return cls(measured, len(log_ratios), True, single)


class NoiseStore:
    """A/A log ratios per key on this host, in ``folder/<host>.json`` (``folder=None``: in memory
    only, for tests and throw-away engines)."""

    def __init__(self, folder: str | Path | None, env: dict[str, Any]) -> None:
        self.host = host_description(env)
        digest = hashlib.sha256(json.dumps(self.host, sort_keys=True).encode()).hexdigest()[:16]
        self.path = None if folder is None else Path(folder) / f"{digest}.json"
        self._memory: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _read(self) -> dict[str, list[float]]:
        if self.path is None:
            return {k: list(v) for k, v in self._memory.items()}
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.path.read_text())
            pairs = data.get("pairs", {}) if isinstance(data, dict) else {}
            return {str(k): [float(x) for x in v if isinstance(x, (int, float)) and math.isfinite(x)]
                    for k, v in pairs.items() if isinstance(v, list)}
        return {}  # missing or unreadable: start again (a measurement, not a record to protect)

    def _write(self, pairs: dict[str, list[float]]) -> None:
        if self.path is None:
            self._memory = pairs
            return
        with contextlib.suppress(OSError):  # a read-only cache folder costs the history, not the request
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".noise-", suffix=".json")
            with os.fdopen(handle, "w") as f:
                json.dump({"host": self.host, "pairs": pairs}, f)
            os.replace(temporary, self.path)

    def pairs(self, key: str) -> list[float]:
        with self._lock:
            return self._read().get(key, [])

    def add(self, key: str, log_ratios: Sequence[float]) -> list[float]:
        """Keep ``log_ratios`` under ``key``; returns every pair now kept for it (oldest first)."""
        with self._lock:
            pairs = self._read()
            kept = (pairs.get(key, []) + [float(x) for x in log_ratios if math.isfinite(x)])[-KEPT_PAIRS:]
            if log_ratios:
                pairs[key] = kept
                self._write(pairs)
            return kept


__all__ = ["KEPT_PAIRS", "NOISE_DIR_ENV", "NoiseStore", "NoiseThreshold", "default_noise_dir", "host_description"]
