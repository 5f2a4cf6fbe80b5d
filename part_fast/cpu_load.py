"""How many cores other processes keep busy: the machine's busy CPU time (Linux /proc/stat; steal time
counts, a core the hypervisor gave to someone else is as lost) minus this process's own, over the wall time
between two samples. The demo names epochs slowed by other processes with it; the benchmark harness
records it next to every figure."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple


class CpuSample(NamedTuple):
    wall: float  # perf_counter seconds
    own: float  # this process's CPU seconds, all threads
    busy: float | None  # the machine's busy CPU seconds since boot; None where /proc/stat cannot be read


def machine_busy_seconds() -> float | None:
    """CPU seconds all the machine's cores have spent busy since boot; None where that cannot be read."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def sample() -> CpuSample:
    return CpuSample(time.perf_counter(), time.process_time(), machine_busy_seconds())


def other_cores(start: CpuSample, end: CpuSample) -> float | None:
    """Cores other processes kept busy between two samples (0: this process had the machine); None when the
    machine's busy time could not be read."""
    (wall0, own0, busy0), (wall1, own1, busy1) = start, end
    if busy0 is None or busy1 is None or wall1 <= wall0:
        return None
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)


def busy_elsewhere(seconds: float = 0.5) -> float | None:
    """How many cores other processes keep busy, sampled over `seconds` while this process sleeps."""
    start = sample()
    time.sleep(seconds)
    return other_cores(start, sample())
