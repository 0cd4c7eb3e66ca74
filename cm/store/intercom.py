"""The intercom's keys in MongoDB: one document per key of a job's run, so they outlive a head restart."""

from __future__ import annotations

import pymongo

from cm.store.documents import IntercomKey


def _keys() -> pymongo.collection.Collection:
    return IntercomKey._get_collection()


def ensure_indexes() -> None:
    IntercomKey.ensure_indexes()


def load_keys(job_id: int, run: int) -> dict[str, tuple[str, int]]:
    """key -> (value, version) of one run of a job."""
    return {d["key"]: (d["value"], d["version"]) for d in _keys().find({"job_id": job_id, "run": run})}


def save_key(job_id: int, run: int, key: str, value: str, version: int) -> None:
    doc = IntercomKey(id=f"{job_id}:{run}:{key}", job_id=job_id, run=run, key=key, value=value, version=version)
    doc.validate()
    _keys().replace_one({"_id": doc.id}, doc.to_mongo().to_dict(), upsert=True)


def drop_keys(job_id: int, keep_run: int | None = None) -> None:
    """Delete a job's keys: of every run, or of every run but ``keep_run``."""
    _keys().delete_many({"job_id": job_id} if keep_run is None else {"job_id": job_id, "run": {"$ne": keep_run}})


def jobs_with_keys() -> list[int]:
    """Jobs that have keys stored: what a starting head checks against the active jobs."""
    return list(_keys().distinct("job_id"))
