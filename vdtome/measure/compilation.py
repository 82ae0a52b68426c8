"""What torch.compile did while a block of code ran: graphs made, graph breaks with their reasons,
recompiles with theirs, and functions that hit dynamo's recompile limit (dynamo then runs them
eagerly, silently: a timing taken after that is of something else).

Read from dynamo's own counters and compilation records (``torch._dynamo.utils``), the figures
``TORCH_LOGS=recompiles,graph_breaks`` prints. Dynamo is not imported for a block that compiled
nothing: watching an eager call costs nothing.
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_DYNAMO = "torch._dynamo"
_LIMIT = "recompile limit"  # in the failure dynamo records for a function over its limit


@dataclass(frozen=True)
class CompileActivity:
    """Dynamo's work in a watched block (zero everywhere: nothing was compiled)."""

    frames: int = 0  # frame compilations started: first compiles and recompiles
    graphs: int = 0  # graphs made
    graph_breaks: tuple[tuple[str, int], ...] = ()  # (reason, how many), most frequent first
    recompiles: tuple[str, ...] = ()  # why each recompile happened (the guard that failed)
    limit_hits: tuple[str, ...] = ()  # functions that hit the recompile limit: eager from then on
    seconds: float = 0.0  # wall time of the block

    @property
    def compiled(self) -> bool:
        return self.frames > 0 or self.graphs > 0

    @property
    def break_count(self) -> int:
        return sum(count for _, count in self.graph_breaks)

    def __add__(self, other: "CompileActivity") -> "CompileActivity":
        breaks = Counter(dict(self.graph_breaks)) + Counter(dict(other.graph_breaks))
        return CompileActivity(self.frames + other.frames, self.graphs + other.graphs,
                               tuple(breaks.most_common()), self.recompiles + other.recompiles,
                               self.limit_hits + other.limit_hits, self.seconds + other.seconds)

    def to_dict(self) -> dict[str, Any]:
        return {"frames": self.frames, "graphs": self.graphs, "graph_break_count": self.break_count,
                "graph_breaks": [{"reason": reason, "count": count} for reason, count in self.graph_breaks],
                "recompiles": list(self.recompiles), "recompile_limit_hits": list(self.limit_hits),
                "seconds": self.seconds}


@dataclass
class CompileWatch:
    """``with CompileWatch() as watch: ...`` then ``watch.activity``."""

    activity: CompileActivity = field(default_factory=CompileActivity)
    _before: tuple[int, int, Counter, list] | None = None
    _started: float = 0.0

    def __enter__(self) -> "CompileWatch":
        self._before = _snapshot() if _DYNAMO in sys.modules else None
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        seconds = time.perf_counter() - self._started
        if _DYNAMO not in sys.modules:  # nothing imported dynamo: nothing was compiled
            self.activity = CompileActivity(seconds=seconds)
            return
        frames, graphs, breaks, records = _snapshot()
        before = self._before or (0, 0, Counter(), [])
        seen = {id(record) for record in before[3]}
        new = [record for record in records if id(record) not in seen]
        self.activity = CompileActivity(
            frames=frames - before[0],
            graphs=graphs - before[1],
            graph_breaks=tuple((breaks - before[2]).most_common()),
            recompiles=tuple(_first_line(r.recompile_reason) for r in new if getattr(r, "recompile_reason", None)),
            limit_hits=tuple(f"{r.co_name} ({r.co_filename})" if getattr(r, "co_name", None) else "a compiled function"
                             for r in new if _LIMIT in str(getattr(r, "fail_reason", "") or "").lower()),
            seconds=seconds,
        )


def _snapshot() -> tuple[int, int, Counter, list]:
    from torch._dynamo.utils import counters, get_compilation_metrics

    breaks: Counter = Counter()
    for reason, count in counters["graph_break"].items():
        breaks[_break_reason(reason)] += count
    return (counters["frames"]["total"], counters["stats"]["unique_graphs"], breaks, list(get_compilation_metrics()))


def _break_reason(text: str) -> str:
    """A graph break's kind and what broke ("Skip calling `torch.compiler.disable()`d function: Skip calling
    function `<function _matching_eager>`..."), without memory addresses (one reason, however often seen)."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    explanation = next((line.removeprefix("Explanation:").strip() for line in lines[1:]
                        if line.startswith("Explanation:")), "")
    reason = lines[0] + (f": {explanation}" if explanation else "") if lines else ""
    return re.sub(r" at 0x[0-9a-f]+", "", reason)[:300]


def _entry(reason: str) -> int:
    """A recompile reason's cache entry number ("37/63: ..." -> 63): how often its function recompiled."""
    match = re.match(r"\d+/(\d+):", reason)
    return int(match.group(1)) if match else -1


def _first_line(text: str) -> str:
    """A dynamo message's first line (its explanation and hints follow on the next lines)."""
    return str(text).strip().splitlines()[0][:300] if str(text).strip() else ""


@dataclass(frozen=True)
class CompilationReport:
    """What dynamo did in one comparison: in its compile phase (both sides run, untimed, until a round
    compiles nothing new; None without a stack modifier that compiles), in the warm-ups and in the
    timed rounds, where any compiling makes the timing include it."""

    compile_phase: CompileActivity | None
    phase_rounds: int
    settled: bool  # the compile phase's last round compiled nothing
    warmups: CompileActivity
    timed: CompileActivity
    # What compiling this stack on this pipeline found in earlier requests (their graphs are reused).
    earlier: CompileActivity | None = None

    @property
    def total(self) -> CompileActivity:
        return (self.compile_phase or CompileActivity()) + self.warmups + self.timed

    @property
    def graph_breaks(self) -> CompileActivity | None:
        """The activity that counted the graph breaks of the code that ran: when it was compiled
        (None: every graph was made by an earlier request with another stack, not known here)."""
        if not self.total.compiled and self.earlier is None:
            return None
        return self.total + (self.earlier or CompileActivity())

    def timing_problem(self) -> str | None:
        """Why the timed rounds are not a measure of the compiled code (None: they are)."""
        total = self.total
        if total.limit_hits:
            most = max(total.recompiles, key=_entry, default=None)  # the function recompiled most often
            why = f" (recompile {most})" if most else ""
            return (f"dynamo hit its recompile limit in {total.limit_hits[0]}{why} and ran it eagerly from then on: "
                    "the timed calls are not of the compiled code")
        if self.timed.compiled:
            why = f" ({self.timed.recompiles[0]})" if self.timed.recompiles else ""
            return (f"dynamo compiled {self.timed.frames} time(s) during the timed rounds{why}: their timings include "
                    "compiling")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"compile_phase": None if self.compile_phase is None else self.compile_phase.to_dict(),
                "compile_phase_rounds": self.phase_rounds, "settled": self.settled,
                "warmups": self.warmups.to_dict(), "timed_rounds": self.timed.to_dict(),
                "earlier": None if self.earlier is None else self.earlier.to_dict(),
                "graph_breaks": None if self.graph_breaks is None else self.graph_breaks.break_count,
                "compiles_in_timed_rounds": self.timed.frames}
