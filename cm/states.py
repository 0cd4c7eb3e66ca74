"""Job and node states, and the one table of allowed job transitions.

Every change of a job's state is checked here first and then written to
MongoDB as a conditional update filtered on the state it leaves, so two
writers can never both win.
"""

from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    PENDING = "PENDING"
    HELD = "HELD"
    DISPATCHING = "DISPATCHING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    @property
    def active(self) -> bool:
        """Holds resources on nodes."""
        return self in (JobState.DISPATCHING, JobState.RUNNING)


FINAL_STATES = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT, JobState.NODE_FAIL}
)

_J = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    _J.PENDING: frozenset({_J.DISPATCHING, _J.HELD, _J.CANCELLED}),
    _J.HELD: frozenset({_J.PENDING, _J.CANCELLED}),
    # a requeued job goes back to PENDING when its node fails
    _J.DISPATCHING: frozenset(
        {_J.RUNNING, _J.PENDING, _J.COMPLETED, _J.FAILED, _J.CANCELLED, _J.TIMEOUT, _J.NODE_FAIL}
    ),
    _J.RUNNING: frozenset({_J.PENDING, _J.COMPLETED, _J.FAILED, _J.CANCELLED, _J.TIMEOUT, _J.NODE_FAIL}),
    **{s: frozenset() for s in FINAL_STATES},
}


class InvalidTransition(ValueError):
    def __init__(self, job_id: int, src: JobState, dst: JobState):
        super().__init__(f"job {job_id}: {src.value} -> {dst.value} is not an allowed transition")
        self.job_id, self.src, self.dst = job_id, src, dst


def check_transition(job_id: int, src: JobState, dst: JobState) -> None:
    """Raise InvalidTransition unless src -> dst is in the table."""
    if dst not in TRANSITIONS[src]:
        raise InvalidTransition(job_id, src, dst)


class NodeState(str, enum.Enum):
    """What cminfo shows for a node; derived from liveness, drain flag and allocations."""

    UNKNOWN = "UNKNOWN"  # registered, not heard from since the head started
    IDLE = "IDLE"
    MIXED = "MIXED"
    ALLOCATED = "ALLOCATED"
    DRAIN = "DRAIN"
    DOWN = "DOWN"
