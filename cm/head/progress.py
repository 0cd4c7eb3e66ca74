"""A sync's progress: each sender rank reports its own; the job shows their sum."""

from __future__ import annotations

from typing import Any

import msgspec

from cm.protocol import COUNT_MAX, Progress, SyncCounters

TOTALS = SyncCounters.__struct_fields__


def report_of(msg: Progress) -> dict[str, Any]:
    """One rank's report as the job record keeps it (stats: its final counters, {} while it runs)."""
    return {**msgspec.structs.asdict(msg.counters),
            "stats": msgspec.structs.asdict(msg.stats) if msg.stats is not None else {}}


def merge(per_rank: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The job's progress: every total summed over ranks, and the final counters summed where reported."""
    total: dict[str, Any] = {k: _capped(sum(p[k] for p in per_rank.values())) for k in TOTALS}
    stats: dict[str, Any] = {}
    for p in per_rank.values():
        for k, v in p["stats"].items():
            stats[k] = _capped(stats.get(k, 0) + v)
    if stats:
        total["stats"] = stats
    return total


def _capped(n: int | float) -> int | float:
    """A sum of 64-bit counters stays one (a float, a rate or seconds, is left as it is)."""
    return min(n, COUNT_MAX) if isinstance(n, int) else n
