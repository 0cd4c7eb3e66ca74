"""DISPATCHING -> RUNNING writes held back a moment, so a job that starts and ends within it costs one write.

The node's JobStarted is acknowledged only once its start is written (the
server holds the ack), so nothing acknowledged is ever lost.
"""

from __future__ import annotations

import time
from typing import Any


class HeldStarts:
    """Per job: the fields of its RUNNING write not yet made, and since when (monotonic)."""

    def __init__(self) -> None:
        self.fields: dict[int, dict[str, Any]] = {}
        self.since: dict[int, float] = {}

    def hold(self, job_id: int, **fields: Any) -> dict[str, Any]:
        """Add fields to the job's held write (started: the first value stays); return them all."""
        self.since.setdefault(job_id, time.monotonic())
        held = self.fields.setdefault(job_id, {})
        for key, value in fields.items():
            held.setdefault(key, value) if key == "started" else held.__setitem__(key, value)
        return held

    def take(self, job_id: int) -> dict[str, Any]:
        """The job's held fields (to write now with its next change), forgotten here."""
        self.since.pop(job_id, None)
        return self.fields.pop(job_id, {})

    def __contains__(self, job_id: int) -> bool:
        return job_id in self.fields

    def due(self, older_than: float) -> list[int]:
        now = time.monotonic()
        return [j for j in list(self.fields) if now - self.since.get(j, 0.0) >= older_than]

    def next_due(self, hold: float) -> float | None:
        return min(self.since.values()) + hold if self.since else None
