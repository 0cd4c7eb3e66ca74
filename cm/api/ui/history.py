"""The history page's numbers, from the jobs the database keeps (cm.store.job_history): bytes and files moved
per day and per partition pair, jobs per state; and its bar chart, drawn as SVG at the head (no script)."""

from __future__ import annotations

import time
from typing import Any

CHART_WIDTH, CHART_HEIGHT, CHART_TOP = 720, 180, 20


def day_start(epoch: float) -> float:
    """Local midnight of the day epoch falls in."""
    t = time.localtime(epoch)
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, -1))


def day_of(epoch: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(epoch))


def summarize(records: list[dict[str, Any]], partition_of: dict[str, str], since: float, days: int) -> dict[str, Any]:
    """records: job_history's. Dry runs move nothing, so they count as jobs, not as bytes."""
    per_day = {day_of(since + (i + 0.5) * 86400): {"bytes": 0, "files": 0, "syncs": 0} for i in range(days)}
    pairs: dict[str, dict[str, int]] = {}
    states: dict[str, int] = {}
    for r in records:
        states[r["state"]] = states.get(r["state"], 0) + 1
        if r["kind"] != "sync" or r["dry_run"]:
            continue
        day = per_day.setdefault(day_of(r["ended"]), {"bytes": 0, "files": 0, "syncs": 0})
        dst = partition_of.get(r["dst"], r["dst"]) if r["dst_is_node"] else r["dst"]
        pair = pairs.setdefault(f"{r['partition']} → {dst}", {"bytes": 0, "files": 0, "syncs": 0})
        for bucket in (day, pair):
            bucket["bytes"] += r["bytes"]
            bucket["files"] += r["files"]
            bucket["syncs"] += 1
    return {"per_day": dict(sorted(per_day.items())), "pairs": dict(sorted(pairs.items())),
            "states": dict(sorted(states.items())), "jobs": len(records)}


def chart(per_day: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Bars of bytes per day: each day's x, y, width and height in the SVG's own units."""
    most = max((d["bytes"] for d in per_day.values()), default=0) or 1
    width = CHART_WIDTH / max(1, len(per_day))
    bars = []
    for i, (day, d) in enumerate(per_day.items()):
        height = CHART_HEIGHT * d["bytes"] / most
        bars.append({"day": day, "bytes": d["bytes"], "x": round(i * width + 2, 1), "width": round(max(1.0, width - 4), 1),
                     "y": round(CHART_TOP + CHART_HEIGHT - height, 1), "height": round(height, 1),
                     "label_x": round(i * width + width / 2, 1)})
    return {"bars": bars, "width": CHART_WIDTH, "height": CHART_TOP + CHART_HEIGHT + 30, "most": most,
            "base": CHART_TOP + CHART_HEIGHT}
