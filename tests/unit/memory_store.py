"""A JobStore in memory (cm.store.jobstore.JobStore's other implementation), and job fields for tests.

tests/unit is a package (like tests/transfer) and its modules import each other relatively: the top-level
tests import helpers from ``conftest`` by name, which must stay tests/conftest.py when both run.
"""

from __future__ import annotations

import copy
import itertools
import time
from typing import Any, Iterable

from cm.states import FINAL_STATES, JobState, check_transition
from cm.store.documents import Job as JobDocument


class MemoryStore:
    """A JobStore in a dict: conditional writes like MongoDB's ``update_one({_id, state}, {$set})``.

    ``writes`` records every write that won, as (kind, job_id, fields); ``docs`` may be changed by a test
    to play another writer.
    """

    def __init__(self) -> None:
        self.docs: dict[int, dict[str, Any]] = {}
        self.writes: list[tuple[str, int, dict[str, Any]]] = []
        self._ids = itertools.count(1)

    def reserve_job_ids(self, count: int) -> range:
        first = next(self._ids)
        for _ in range(count - 1):
            next(self._ids)
        return range(first, first + count)

    def insert_job(self, fields: dict[str, Any]) -> dict[str, Any]:
        doc = JobDocument(**fields)
        doc.validate()
        son = doc.to_mongo().to_dict()
        self.docs[son["_id"]] = copy.deepcopy(son)
        self.writes.append(("insert", son["_id"], dict(fields)))
        return son

    def _set(self, job_id: int, fields: dict[str, Any]) -> None:
        doc = self.docs[job_id]
        for key, value in copy.deepcopy(fields).items():
            parts = key.split(".")
            target: Any = doc
            for part in parts[:-1]:
                target = target[int(part)] if isinstance(target, list) else target[part]
            target[parts[-1]] = value

    def transition(self, job_id: int, src: JobState, dst: JobState, **fields: Any) -> bool:
        check_transition(job_id, src, dst)
        doc = self.docs.get(job_id)
        if doc is None or doc["state"] != src.value:
            return False
        self._set(job_id, {"state": dst.value, **fields})
        self.writes.append(("transition", job_id, {"state": dst.value, **fields}))
        return True

    def update_job(self, job_id: int, states: Iterable[JobState], **fields: Any) -> bool:
        doc = self.docs.get(job_id)
        if doc is None or doc["state"] not in {s.value for s in states}:
            return False
        self._set(job_id, fields)
        self.writes.append(("update", job_id, dict(fields)))
        return True

    def get_job(self, job_id: int) -> dict[str, Any] | None:
        doc = self.docs.get(job_id)
        return copy.deepcopy(doc) if doc is not None else None

    def job_by_key(self, uid: int, key: str) -> dict[str, Any] | None:
        doc = next((d for d in self.docs.values() if d["uid"] == uid and d.get("idempotency_key") == key), None)
        return copy.deepcopy(doc) if doc is not None else None

    def delete_job(self, job_id: int) -> bool:
        doc = self.docs.get(job_id)
        if doc is None or doc["state"] not in {s.value for s in FINAL_STATES}:
            return False
        del self.docs[job_id]
        self.writes.append(("delete", job_id, {}))
        return True

    def active_jobs(self) -> list[dict[str, Any]]:
        final = {s.value for s in FINAL_STATES}
        return [copy.deepcopy(d) for d in self.docs.values() if d["state"] not in final]

    def recent_jobs(self, since: float | None, limit: int = 100000, finished: bool = False) -> list[dict[str, Any]]:
        out = [copy.deepcopy(d) for d in self.docs.values()
               if since is None or (d.get("ended") or 0) >= since or (not finished and d.get("ended") is None)]
        return sorted(out, key=lambda d: -d["_id"])[:limit]


def command_fields(**over: Any) -> dict[str, Any]:
    fields = {"user": "ann", "uid": 1000, "gid": 1000, "kind": "command", "nodes": 1, "time_limit": 60.0,
              "requeue": False, "submitted": time.time(), "state": "PENDING", "name": "job", "argv": ["true"],
              "env": [], "cwd": "/home/ann", "procs": 1, "cpus": 1, "mem_mb": 0, "partition": "cpu",
              "stdout": "", "stderr": ""}
    return {**fields, **over}


def sync_fields(**over: Any) -> dict[str, Any]:
    options = {"delete": False, "dry_run": False, "checksum": False, "exclude": [], "bwlimit": None,
               "policy": "size-balanced", "streams": 4, "chunk_size": 64 << 20, "owners": False}
    fields = command_fields(kind="sync", name="sync", argv=[], sync={
        "src": {"partition": "cpu", "path": "/a"}, "dst": {"partition": "gpu", "path": "/b"},
        "options": options, "token": "ab" * 16, "transport": "tcp"})
    return {**fields, **over}
