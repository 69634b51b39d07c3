"""Benchmark helpers (outside the serving pipeline): CPU time from /proc (Linux).

The machine is shared; a benchmark that competed for the cores says so in its notes instead
of silently reporting slow numbers. `OtherCpuMeter` measures how much of the machine
processes other than ours used over a period; rounds above CONTENTION_WARNING are not quiet.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

CONTENTION_WARNING = 0.10  # share of all cores used by other processes


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    utime, stime = stat.rsplit(")", 1)[1].split()[11:13]  # fields 14 and 15
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


class OtherCpuMeter:
    """How much CPU processes other than `pids` used from construction to `other_share()`."""

    def __init__(self, pids: Iterable[int]) -> None:
        self.pids = list(pids)
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        """(wall seconds, CPU seconds of the whole machine, CPU seconds of our processes)."""
        machine = machine_busy_seconds()
        ours = sum(process_cpu_seconds(pid) for pid in self.pids)
        return time.monotonic(), machine, ours

    def other_share(self) -> float:
        """Fraction of all cores (0..1) used by other processes since construction."""
        wall0, machine0, ours0 = self.start
        wall1, machine1, ours1 = self._sample()
        others = (machine1 - machine0) - (ours1 - ours0)
        return max(0.0, others / ((wall1 - wall0) * (os.cpu_count() or 1)))


def quiet_rounds(shares: list[float]) -> list[int]:
    """The indexes of the rounds in which other processes stayed within CONTENTION_WARNING
    (llama.cpp's spinning threads drop to a tenth of their speed while another process holds
    a core, so a busy round flatters every ratio against it)."""
    return [i for i, share in enumerate(shares) if share <= CONTENTION_WARNING]
