"""The head's rules about how jobs end, each written once (cm.head.jobs and cm.head.endings apply them).

- **Restart a sync?** (``may_restart``) A sync whose share was lost, whose node was lost, or whose sender
  lost its receiver (exit TRANSIENT) runs again, unless it is being cancelled, is already being stopped
  (a forced end is under way: it ends as that), or has restarted ``SYNC_RESTARTS`` times; then it ends.
- **Requeue?** (``may_requeue``) A ``--requeue`` command job whose share or node was lost waits again,
  under the same conditions but for the cap: a requeue is the user's wish, not a retry.
- **Which forced end wins** (``forced_end``): a cancel asked for wins; else the first of ``FORCED``
  (TIMEOUT, NODE_FAIL, CANCELLED) that one of the job's shares ended in. A job being stopped again
  after a head restart ends as ``final_state`` will say it did.
"""

from __future__ import annotations

import time
from typing import Any

from cm.head.records import Job, SlotRecord
from cm.protocol import ShareKey
from cm.states import JobState

SYNC_RESTARTS = 5
FORCED = (JobState.TIMEOUT, JobState.NODE_FAIL, JobState.CANCELLED)  # a share stopped by force stops the job


def forced_end(job: Job, receivers: bool = True) -> JobState | None:
    """How the job ends if it is being stopped by force (a cancel, or a slot ended by force), else None.
    ``receivers``: whether a receiver's end counts (it does while the job is being stopped: a lost receiver
    stops the senders; not in the final state, which is the senders')."""
    if job.get("cancel_requested"):
        return JobState.CANCELLED
    states = {s["state"] for s in job["slots"] if s["ended"] and (receivers or s["role"] != "dst")}
    return next((severe for severe in FORCED if severe.value in states), None)


def may_restart(job: Job, stopping: bool) -> bool:
    return (job["kind"] == "sync" and not job.get("cancel_requested") and not stopping
            and job.get("restarts", 0) < SYNC_RESTARTS)


def may_requeue(job: Job, stopping: bool) -> bool:
    return job["kind"] == "command" and bool(job.get("requeue")) and not job.get("cancel_requested") and not stopping


def final_state(job: Job) -> tuple[JobState, int]:
    """The state and exit code of a job whose every slot has ended."""
    slots = sorted((s for s in job["slots"] if s["role"] != "dst"), key=lambda s: s["rank"])
    exit_code = next((s["exit_code"] for s in slots if s["exit_code"] != 0), 0)
    forced = forced_end(job, receivers=False)
    if forced is not None:
        return forced, exit_code
    if any(s["state"] == JobState.FAILED.value for s in slots):
        return JobState.FAILED, next((s["exit_code"] for s in slots
                                      if s["state"] == JobState.FAILED.value and s["exit_code"]), exit_code or 1)
    return JobState.COMPLETED, exit_code  # 0, or a sync's 24: copied all but files that vanished (exitcodes)


def slot_key(job: Job, slot: SlotRecord) -> ShareKey:
    """The share a slot of the job's current run is, as its node names it."""
    return ShareKey(job["_id"], job.get("runs", 0), slot["role"], slot["rank"])


def stamp(at: float, floor: float | None, now: float) -> float:
    """When something happened by a node's clock (``at``; 0: not said), as the job's time: not after ``now``
    (the head's wall clock), not before ``floor`` (what came before it). A head that was down when it
    happened still gets the real time, so a job's elapsed time does not count the head's downtime."""
    return max(floor or 0.0, min(at, now)) if at else now


def apply_fields(job: Job, fields: dict[str, Any]) -> None:
    """Make in memory the change ``fields`` made in the store (``slots.N.key``: one slot's key)."""
    for key, value in fields.items():
        if key.startswith("slots."):
            _, index, name = key.split(".", 2)
            job["slots"][int(index)][name] = value  # type: ignore[literal-required]
        elif "." not in key:
            job[key] = value  # type: ignore[literal-required]


def preview(job: Job, fields: dict[str, Any]) -> Job:
    """The job as it will be once ``fields`` are written (memory is changed only after the write)."""
    view: Job = {**job, "slots": [SlotRecord(**s) for s in job.get("slots", ())]}  # type: ignore[typeddict-item]
    apply_fields(view, fields)
    return view


class Clock:
    """The head's time, as the events brought it (cm.head.state sets it); read by the job table, never the
    system's clock. A table made without one (the unit tests) reads the system's."""

    def __init__(self, mono: float | None = None, wall: float | None = None) -> None:
        self.fixed = mono is not None
        self._mono, self._wall = mono or 0.0, wall or 0.0

    def set(self, mono: float, wall: float) -> None:
        self.fixed, self._mono, self._wall = True, mono, wall

    def mono(self) -> float:
        return self._mono if self.fixed else time.monotonic()

    def wall(self) -> float:
        return self._wall if self.fixed else time.time()
