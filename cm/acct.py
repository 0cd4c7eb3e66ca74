"""Accounting, beside the head's loop: finished jobs by when they ended, their totals, and their purge.

``cmacct`` and ``GET /v1/jobs?ended_after=...`` come here through the HTTP API's thread
(cm.api.routes), which runs ``report`` in its executor: a query over a year of jobs never stalls the
head's loop. Finished jobs are read from the database, where they are written before they leave the
head's memory, so nothing here reads head state. ``Purger`` deletes what ended more than CM_ACCT_DAYS ago,
from a thread of its own, once at the head's start and then every PURGE_EVERY seconds (FerretDB has no
TTL index, and ``ended`` is epoch seconds, not a date).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterable

from cm.logs import event
from cm.states import FINAL_STATES

log = logging.getLogger("cm.acct")
FINAL = sorted(s.value for s in FINAL_STATES)  # the states a finished job can be in
PURGE_EVERY = 3600.0
MAX_ROWS = 100000  # jobs one answer lists, and its totals count: a window with more says "truncated"


class Forbidden(Exception):
    """The caller asked for someone else's jobs without being an administrator."""


def whose(caller, user: str | None, all_users: bool) -> str | None:
    """The user whose jobs the caller gets (None: everyone's): their own unless they are an administrator
    (root, the operator group), as for every other job operation (cm.head.requests)."""
    if caller.operator:
        return None if all_users and not user else user
    if all_users or (user and user != caller.user):
        raise Forbidden(f"{caller.user} may see only their own jobs; other users' and --allusers need an "
                        "administrator (root or the operator group)")
    return caller.user


def pair_of(job: dict[str, Any]) -> str:
    """A job's partition pair: SRC->DST for a sync (a node where no partition was named), else its partition."""
    if job["kind"] != "sync":
        return job["partition"]
    dst = (job.get("sync") or {}).get("dst") or {}
    return f"{job['partition']}->{dst.get('partition') or dst.get('node') or '?'}"


def node_hours(job: dict[str, Any]) -> float:
    started, ended = job.get("started"), job.get("ended")
    if not started or not ended or ended <= started:
        return 0.0
    nodes = {s["node"] for s in job.get("slots") or ()}
    return (ended - started) * max(1, len(nodes)) / 3600.0


def totals(jobs: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per user and per partition pair: jobs, bytes and files moved (syncs), node-hours."""
    by: dict[str, dict[str, dict[str, Any]]] = {"users": {}, "pairs": {}}
    for job in jobs:
        progress = job.get("progress") or {}
        for table, key, name in (("users", job["user"], "user"), ("pairs", pair_of(job), "pair")):
            row = by[table].setdefault(key, {name: key, "jobs": 0, "bytes": 0, "files": 0, "node_hours": 0.0})
            row["jobs"] += 1
            row["bytes"] += progress.get("bytes_done", 0)
            row["files"] += progress.get("files_done", 0)
            row["node_hours"] += node_hours(job)
    return {table: [{**r, "node_hours": round(r["node_hours"], 4)} for _, r in sorted(rows.items())]
            for table, rows in by.items()}


def report(after: float, before: float | None, user: str | None, states: list[str], name: str | None,
           labels: dict[str, str]) -> dict[str, Any]:
    """The answer to an accounting query: the jobs (at most MAX_ROWS, oldest end first) and the totals."""
    from cm.head.requests import job_view
    from cm.store import acct

    jobs = acct.ended_jobs(after, before, user, states, name, labels, limit=MAX_ROWS + 1)
    truncated = len(jobs) > MAX_ROWS
    return {"jobs": [job_view(j) for j in jobs[:MAX_ROWS]], "totals": totals(jobs[:MAX_ROWS]),
            "truncated": truncated, "ended_after": after, "ended_before": before}


class Purger:
    """Deletes finished jobs older than ``days`` days, in a thread of its own (0 days: keeps everything)."""

    def __init__(self, days: float, every: float = PURGE_EVERY):
        self.days, self.every = days, every
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.days > 0:
            self.thread = threading.Thread(target=self._run, name="acct-purge", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def purge_once(self) -> int:
        from cm.store import acct

        return acct.purge(time.time() - self.days * 86400.0)

    def _run(self) -> None:
        from cm import store

        while not self.stop_event.is_set():
            try:
                gone = self.purge_once()
                if gone:
                    event(log, "accounting records purged", jobs=gone, days=self.days)
            except store.DatabaseError as exc:  # the head's loop deals with an outage; this tries again later
                event(log, "accounting purge failed", logging.WARNING, error=str(exc)[:300])
            self.stop_event.wait(self.every)
