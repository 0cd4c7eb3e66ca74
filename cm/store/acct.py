"""Accounting: finished jobs by the time they ended (cmacct, GET /v1/jobs?ended_after=...), and their purge.

A finished job's document is its accounting record: nothing is copied anywhere. The jobs collection's
indexes ``(ended)`` and ``(user, ended)`` (cm.store.documents) serve every query here: a window of a day out
of a year of jobs reads the window's entries only. On the embedded FerretDB (SQLite backend) that takes the
comment RANGE and both bounds of ``ended``: its pushdown.patch then searches the ``ended`` index with them
(cm/cluster/ferretdb/pushdown.patch, item 3); without them it reads the whole collection. So a window always
has an upper bound. These calls are made off the head's loop (the HTTP API's threads, the purger's).
"""

from __future__ import annotations

import time
from typing import Any, Iterable

import pymongo

from cm.states import FINAL_STATES
from cm.store.documents import Job
from cm.store.records import JobRecord, plain

FINAL = sorted(s.value for s in FINAL_STATES)
EPOCH_FLOOR = 1e9  # 2001-09-09: no job ended before (a purge's lower bound, for the index)
RANGE = "cm:range:ended"  # the query's comment: `ended` is a number in every document (what FerretDB needs to know)
# what a listing needs of a job (its environment, command line and sync options stay behind)
PROJECTION = {"env": 0, "argv": 0, "sync.options": 0, "sync.nonce": 0}


def _jobs() -> pymongo.collection.Collection:
    return Job._get_collection()


def query(after: float, before: float | None, user: str | None = None, states: Iterable[str] = (),
          name: str | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The filter of finished jobs that ended in [after, before) (before None: until now)."""
    wanted = list(states) or FINAL
    ended = {"$gte": max(after, EPOCH_FLOOR), "$lt": time.time() + 1 if before is None else before}
    q: dict[str, Any] = {"ended": ended, "state": {"$in": wanted}}
    if user is not None:
        q["user"] = user
    if name is not None:
        q["name"] = name
    for key, value in (labels or {}).items():
        q[f"labels.{key}"] = value
    return q


def ended_jobs(after: float, before: float | None, user: str | None = None, states: Iterable[str] = (),
               name: str | None = None, labels: dict[str, str] | None = None,
               limit: int = 100000) -> list[dict[str, Any]]:
    """Finished jobs that ended in [after, before), oldest end first, at most ``limit`` (as JobRecord builtins)."""
    cursor = _jobs().find(query(after, before, user, states, name, labels), PROJECTION, comment=RANGE)
    cursor = cursor.sort([("ended", pymongo.ASCENDING), ("_id", pymongo.ASCENDING)]).limit(limit)
    return [plain(d, JobRecord) for d in cursor]


def purge(before: float) -> int:
    """Delete the finished jobs that ended before ``before`` (epoch seconds); how many went.

    Found through the ``ended`` index, then deleted one by one by ``_id``: FerretDB pushes neither a delete's
    range nor ``$in`` down (each would read the whole collection), and runs a bulk_write slowly
    (docs/BENCHMARKS.md); this runs in the purger's thread."""
    final = {"$in": FINAL}
    found = _jobs().find({"ended": {"$gte": EPOCH_FLOOR, "$lt": before}, "state": final}, {"_id": 1}, comment=RANGE)
    return sum(_jobs().delete_one({"_id": d["_id"], "state": final}).deleted_count for d in list(found))
