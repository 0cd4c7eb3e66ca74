"""What this machine offers: measured, unless config says otherwise (simulation)."""

from __future__ import annotations

import os


def measure(cpus: int = 0, mem_mb: int = 0) -> tuple[int, int]:
    """(CPUs, memory in MB): the given values when non-zero, else the machine's."""
    if not cpus:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:
            cpus = os.cpu_count() or 1
    if not mem_mb:
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    return cpus, mem_mb
