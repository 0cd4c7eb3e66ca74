"""What the head knows of an unfinished job that is not stored: one ``Runtime`` beside each stored ``Job``.

Lost with the head and rebuilt on load (cm.head.jobs.JobTable.load); a new kind of memory-only knowledge
about a job is one more field here, and forgetting a job forgets all of it at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cm.head.resources import Request


@dataclass(slots=True)
class Runtime:
    request: Request | None = None  # PENDING: what the scheduler sees of it
    reason: str | None = None  # PENDING or HELD: why it waits (squeue's code); None for any other job
    stopping: tuple[float, str] | None = None  # told to stop: (monotonic deadline, state its shares end in)
    # when the current run's latest RunJobs went out (monotonic); a share sent must start within the
    # table's start_timeout. An active job learned from the store counts from when it was loaded.
    sent_at: float = 0.0
    src_sent: bool = False  # the current run's senders were told to start (a sync: once receivers started)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)  # a sync's progress by sender rank
    ended_at: float = 0.0  # the latest end of a share of the current run, by its node's clock
    # the DISPATCHING -> RUNNING write held back a moment (merged with the job's end if it comes soon):
    # its fields, and since when (monotonic); the node's JobStarted is acknowledged once it is written
    held: dict[str, Any] | None = None
    held_since: float = 0.0

    def new_run(self, now: float) -> None:
        """A new run was dispatched: what was known of the last one is void."""
        self.sent_at, self.src_sent, self.progress, self.ended_at = now, False, {}, 0.0
