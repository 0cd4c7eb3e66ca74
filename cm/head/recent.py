"""Finished jobs cminfo lists without --all, kept in memory so it never scans the database."""

from __future__ import annotations

import collections
import time
from typing import Callable, Iterable

from cm.head.records import Job


class RecentJobs:
    """Finished jobs, oldest first: those that ended within ``seconds``, at most ``most`` of them."""

    def __init__(self, seconds: float = 300.0, most: int = 20000, now: Callable[[], float] = time.time) -> None:
        self.seconds, self.most, self.now = seconds, most, now  # now: the wall clock (the head's, from events)
        self.jobs: collections.OrderedDict[int, Job] = collections.OrderedDict()

    def load(self, finished: Iterable[Job]) -> None:
        self.jobs = collections.OrderedDict((j["_id"], j) for j in sorted(finished, key=lambda j: j["ended"]))

    def add(self, job: Job) -> None:
        self.jobs[job["_id"]] = job
        self.prune()

    def get(self, job_id: int) -> Job | None:
        return self.jobs.get(job_id)

    def discard(self, job_id: int) -> None:
        self.jobs.pop(job_id, None)

    def prune(self) -> None:
        oldest = self.now() - self.seconds
        while self.jobs:
            job = next(iter(self.jobs.values()))
            if len(self.jobs) <= self.most and (job.get("ended") or 0) >= oldest:
                break
            self.jobs.popitem(last=False)

    def values(self) -> list[Job]:
        self.prune()
        return list(self.jobs.values())
