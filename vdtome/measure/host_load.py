"""Did another process share the cores while a request was timed?

Timing noise that hits both sides alike cancels in a paired ratio; a CPU-bound neighbour does not
hit them alike (it steals whole time slices from whichever call is running), and on two cores a
second busy process halves the machine. The phases a method cannot touch only catch that when they
are long enough to measure; this asks the kernel directly: the machine's busy CPU time
(``/proc/stat`` through psutil, steal time of a virtual machine included) minus this process's
own, over the timed calls' wall time, is how many cores others used meanwhile.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch

#: Others may use this many cores beyond the ones this process's threads leave free before the
#: request is called busy: a quiet machine's daemons use a few hundredths of a core.
SPARE_CORES = 0.25


@dataclass(frozen=True)
class HostLoad:
    """CPU time the rest of the machine used during ``wall_s`` seconds of this request's calls.

    ``cores``: logical CPUs of the machine; ``threads``: torch's intra-op threads (what this
    process needs); ``others_s``: busy CPU-seconds of other processes (steal time included);
    ``steal_s``: of those, time the hypervisor gave to other machines."""

    wall_s: float
    others_s: float
    steal_s: float
    cores: int
    threads: int

    @property
    def other_cores(self) -> float:
        """Cores other processes kept busy on average."""
        return self.others_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def free_cores(self) -> float:
        """Cores this process's threads leave to others."""
        return max(self.cores - self.threads, 0)

    @property
    def busy(self) -> str | None:
        """Why the timed calls had to share their cores, or None."""
        if self.other_cores <= self.free_cores + SPARE_CORES:
            return None
        steal = f", {self.steal_s / self.wall_s:.2f} of them stolen by the hypervisor" if self.steal_s > 0.05 * self.wall_s else ""
        return (f"other processes kept {self.other_cores:.2f} of the {self.cores} cores busy during the timed calls "
                f"(this process runs {self.threads} threads{steal})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"other_cores": self.other_cores, "busy": self.busy}


class HostLoadMonitor:
    """``with HostLoadMonitor() as monitor: ...`` then ``monitor.load`` (None if unmeasurable)."""

    def __init__(self) -> None:
        self.load: HostLoad | None = None
        self._process = psutil.Process()

    @staticmethod
    def _busy(times: Any) -> float:
        idle = times.idle + getattr(times, "iowait", 0.0)
        # guest time is already counted in user time on Linux
        return sum(times) - idle - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)

    def _own(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system + times.children_user + times.children_system

    def __enter__(self) -> "HostLoadMonitor":
        self._start = (time.monotonic(), psutil.cpu_times(), self._own())
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            wall, machine, own = time.monotonic(), psutil.cpu_times(), self._own()
        except (OSError, psutil.Error):
            return
        start_wall, start_machine, start_own = self._start
        busy = self._busy(machine) - self._busy(start_machine)
        steal = getattr(machine, "steal", 0.0) - getattr(start_machine, "steal", 0.0)
        self.load = HostLoad(wall_s=wall - start_wall, others_s=max(busy - (own - start_own), 0.0),
                             steal_s=max(steal, 0.0), cores=psutil.cpu_count() or 1, threads=torch.get_num_threads())


__all__ = ["HostLoad", "HostLoadMonitor", "SPARE_CORES"]
