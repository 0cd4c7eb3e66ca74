"""The job table's view of storage: a small Protocol, and its MongoDB implementation.

``cm.head.jobs.JobTable`` takes a ``JobStore``, so its state machine runs
against MongoDB in the head and against an in-memory store in the unit tests
(``tests/unit/memory_store.py``). Every write is conditional on the job's
state and says whether it won.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

from cm.states import JobState
from cm.store import jobs as mongo


class JobStore(Protocol):
    def reserve_job_ids(self, count: int) -> range:
        """A block of fresh job ids, never handed out again."""

    def insert_job(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Validate and store a new job; return the stored record (with ``_id``)."""

    def transition(self, job_id: int, src: JobState, dst: JobState, **fields: Any) -> bool:
        """Move a job from src to dst, setting fields (``slots.N.key`` for one slot's key); False if it is not in src."""

    def update_job(self, job_id: int, states: Iterable[JobState], **fields: Any) -> bool:
        """Set fields while the job is in one of states; False if it is not."""

    def get_job(self, job_id: int) -> dict[str, Any] | None: ...

    def job_by_key(self, uid: int, key: str) -> dict[str, Any] | None:
        """The job a user submitted with this idempotency key, if any."""

    def delete_job(self, job_id: int) -> bool:
        """Remove a final job; False if it is not there or not final."""

    def active_jobs(self) -> list[dict[str, Any]]:
        """Every job that is not final."""

    def recent_jobs(self, since: float | None, limit: int = 100000, finished: bool = False) -> list[dict[str, Any]]:
        """Jobs that ended after ``since`` (all if None), and unfinished ones unless ``finished``."""


class MongoJobStore:
    """The jobs collection (cm.store.jobs)."""

    reserve_job_ids = staticmethod(mongo.reserve_job_ids)
    insert_job = staticmethod(mongo.insert_job)
    transition = staticmethod(mongo.transition)
    update_job = staticmethod(mongo.update_job)
    get_job = staticmethod(mongo.get_job)
    job_by_key = staticmethod(mongo.job_by_key)
    delete_job = staticmethod(mongo.delete_job)
    active_jobs = staticmethod(mongo.active_jobs)
    recent_jobs = staticmethod(mongo.recent_jobs)
