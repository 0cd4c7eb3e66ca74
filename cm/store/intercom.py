"""The intercom's keys in MongoDB: one document per key of a job's run, so they outlive a head restart."""

from __future__ import annotations

import pymongo
from pymongo import DeleteMany, ReplaceOne

from cm.store.documents import IntercomKey
from cm.store.records import IntercomKeyRecord, typed


def _keys() -> pymongo.collection.Collection:
    return IntercomKey._get_collection()


def ensure_indexes() -> None:
    IntercomKey.ensure_indexes()


def load_keys(job_id: int, run: int) -> dict[str, tuple[str, int]]:
    """key -> (value, version) of one run of a job."""
    keys = (typed(d, IntercomKeyRecord) for d in _keys().find({"job_id": job_id, "run": run}))
    return {k.key: (k.value, k.version) for k in keys}


def apply(changes: list[tuple]) -> None:
    """Several changes in order, in one round trip: ("save", job, run, key, value, version) and
    ("drop", job, keep_run or None): a job's keys of every run, or of every run but keep_run."""
    ops: list = []
    for change in changes:
        if change[0] == "save":
            _, job_id, run, key, value, version = change
            doc = IntercomKey(id=f"{job_id}:{run}:{key}", job_id=job_id, run=run, key=key, value=value,
                              version=version)
            doc.validate()
            ops.append(ReplaceOne({"_id": doc.id}, doc.to_mongo().to_dict(), upsert=True))
        else:
            _, job_id, keep_run = change
            ops.append(DeleteMany({"job_id": job_id} if keep_run is None else
                                  {"job_id": job_id, "run": {"$ne": keep_run}}))
    if ops:
        _keys().bulk_write(ops, ordered=True)


def jobs_with_keys() -> list[int]:
    """Jobs that have keys stored: what a starting head checks against the active jobs."""
    return [int(j) for j in _keys().distinct("job_id")]
