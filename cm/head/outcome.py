"""What a change to the job table asks of the server: commands for nodes, nodes to drain."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cm.protocol import ANY_RANK, ANY_ROLE, ANY_RUN, NodeJob
from cm.states import JobState


@dataclass(frozen=True)
class Stop:
    """Stop one share of a job on a node (role "": every share of the job there) and report it as `state`."""

    node: str
    job_id: int
    state: str
    run: int = ANY_RUN
    role: str = ANY_ROLE
    rank: int = ANY_RANK
    reason: str = ""


@dataclass
class Outcome:
    """What the server must do after a change: commands for nodes, nodes to drain, whether to schedule."""

    run: list[tuple[str, int, NodeJob]] = field(default_factory=list)  # (node, job_id, spec)
    kill: list[Stop] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    drain: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)

    def extend(self, other: "Outcome") -> None:
        self.run += other.run
        self.kill += other.kill
        self.finished += other.finished
        self.drain += other.drain


def stop_slot(job: dict[str, Any], slot: dict[str, Any], state: JobState | str, reason: str = "") -> Stop:
    state = state.value if isinstance(state, JobState) else state
    return Stop(slot["node"], job["_id"], state, job.get("runs", 0), slot["role"], slot["rank"], reason)
