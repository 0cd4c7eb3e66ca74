"""Atomic operations on jobs, nodes and counters. Only this package talks to MongoDB.

Hot paths go through the raw pymongo collection of each document class: a
scheduler pass must not pay for building mongoengine objects it only reads.
Every state change is ``update_one({_id, state: FROM}, ...)``: the state
table in cm.states decides what is allowed, the filter decides who wins.
Every read hands back builtins checked against its record (cm.store.records):
no driver type leaves this package.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Iterable

import mongoengine
import pymongo
from pymongo import ReturnDocument
from pymongo.errors import ConnectionFailure, PyMongoError

from cm.cluster.db import redact
from cm.states import FINAL_STATES, JobState, check_transition
from cm.store.documents import ApiToken, Counter, Job, Node, Policy
from cm.store.records import CounterRecord, JobRecord, NodeRecord, PolicyRecord, TokenRecord, plain, typed


class StoreError(RuntimeError):
    """The database could not be reached or refused an operation."""


DatabaseError = PyMongoError  # what any call below may raise
DatabaseUnreachable = ConnectionFailure  # the part of it that means the server is away


def database_uri(uri: str, uri_file: str = "") -> str:
    """The URI to connect to: the first line of uri_file when one is given, else uri.

    The file holds credentials, so it must be the reader's own and closed to group and others; a file
    anyone else can read (or write, to point the head elsewhere) is refused rather than used."""
    if not uri_file:
        return uri
    try:
        fd = os.open(uri_file, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise StoreError(f"cannot read the database URI file {uri_file}: {exc.strerror}") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StoreError(f"the database URI file {uri_file} must belong to uid {os.geteuid()} and have mode "
                             f"0600 or 0400 (it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): "
                             "its credentials are the whole database")
        text = f.readline().strip()
    if not text:
        raise StoreError(f"the database URI file {uri_file} is empty")
    return text


def connect(uri: str, db_name: str, timeout: float = 5.0) -> None:
    """Connect the default alias; raise StoreError if the server does not answer."""
    mongoengine.disconnect()
    ms = int(timeout * 1000)
    mongoengine.connect(
        db=db_name, host=uri, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=ms * 4, tz_aware=False,
        heartbeatFrequencyMS=500,  # notice an outage within a second (see reachable())
    )
    try:
        Job._get_db().command("ping")
        Job.ensure_indexes()
    except PyMongoError as exc:
        raise StoreError(f"database at {redact(uri)} is unreachable: {exc}") from None


def reachable() -> bool:
    """What the driver's monitor last saw of the server: no I/O, so cheap enough for every request."""
    return Job._get_db().client.topology_description.has_writable_server()


def ping(timeout: float) -> bool:
    """True if the server answers within timeout seconds."""
    try:
        with pymongo.timeout(timeout):
            Job._get_db().command("ping")
        return True
    except PyMongoError:
        return False


def disconnect() -> None:
    mongoengine.disconnect()


def _jobs() -> pymongo.collection.Collection:
    return Job._get_collection()


def reserve_job_ids(count: int) -> range:
    """A block of fresh job ids. Ids of a block a head did not use before it stopped are skipped, never reused."""
    doc = Counter._get_collection().find_one_and_update(
        {"_id": "job"}, {"$inc": {"seq": count}}, upsert=True, return_document=ReturnDocument.AFTER
    )
    seq = typed(doc, CounterRecord).seq
    return range(seq - count + 1, seq + 1)


def insert_job(fields: dict[str, Any]) -> dict[str, Any]:
    """Validate through the Job document and insert it; return the stored dict."""
    job = Job(**fields)
    job.validate()
    son = job.to_mongo().to_dict()
    _jobs().insert_one(son)
    return _job(son)


def transition(job_id: int, src: JobState, dst: JobState, **fields: Any) -> bool:
    """Move a job from src to dst, setting fields. False if another writer moved it first."""
    check_transition(job_id, src, dst)
    update = {"state": dst.value, **fields}
    res = _jobs().update_one({"_id": job_id, "state": src.value}, {"$set": update})
    return res.modified_count == 1


def update_job(job_id: int, states: Iterable[JobState], **fields: Any) -> bool:
    """Set fields on a job only while it is in one of states (no state change)."""
    res = _jobs().update_one(
        {"_id": job_id, "state": {"$in": [s.value for s in states]}}, {"$set": fields}
    )
    return res.matched_count == 1  # matched: setting a value a field already has is no lost race


def _job(doc: dict[str, Any]) -> dict[str, Any]:
    """Every job read goes through here: the stored document as a typed record, as builtins."""
    return plain(doc, JobRecord)


def _one_job(query: dict[str, Any]) -> dict[str, Any] | None:
    doc = _jobs().find_one(query)
    return None if doc is None else _job(doc)


def get_job(job_id: int) -> dict[str, Any] | None:
    return _one_job({"_id": job_id})


def job_by_key(uid: int, key: str) -> dict[str, Any] | None:
    """The job a user submitted with this Idempotency-Key, if any."""
    return _one_job({"uid": uid, "idempotency_key": key})


def delete_job(job_id: int) -> bool:
    """Remove a final job from the database; False if it is not there or not final."""
    final = [s.value for s in FINAL_STATES]
    return _jobs().delete_one({"_id": job_id, "state": {"$in": final}}).deleted_count == 1


def active_jobs() -> list[dict[str, Any]]:
    """Every job that is not final, for the head's memory at start."""
    final = [s.value for s in FINAL_STATES]
    return [_job(d) for d in _jobs().find({"state": {"$nin": final}})]


def recent_jobs(since: float | None, limit: int = 100000, finished: bool = False) -> list[dict[str, Any]]:
    """Jobs for cminfo: those that ended after `since` (all if None), and unfinished ones unless `finished`."""
    query: dict[str, Any] = {}
    if since is not None:
        query["ended"] = {"$gte": since}
        if not finished:
            query = {"$or": [{"ended": None}, query]}
    projection = {"env": 0}
    return [_job(d) for d in _jobs().find(query, projection).sort("_id", pymongo.DESCENDING).limit(limit)]


def job_history(since: float, limit: int = 200000) -> list[dict[str, Any]]:
    """What the web page's history counts of the jobs that ended at or after `since` (Unix time): state,
    kind, end, user, source partition, a sync's destination, dry run or not, bytes and files moved."""
    out = []
    projection = {"state": 1, "kind": 1, "ended": 1, "user": 1, "partition": 1, "sync": 1, "progress": 1}
    for d in _jobs().find({"ended": {"$gte": since}}, projection).limit(limit):
        sync, progress = d.get("sync") or {}, d.get("progress") or {}
        dst = sync.get("dst") or {}
        out.append({
            "state": str(d["state"]), "kind": str(d["kind"]), "ended": float(d["ended"]), "user": str(d["user"]),
            "partition": str(d.get("partition") or ""),
            "dst": str(dst.get("node") or dst.get("partition") or ""), "dst_is_node": bool(dst.get("node")),
            "dry_run": bool((sync.get("options") or {}).get("dry_run")),
            "bytes": int(progress.get("bytes_done") or 0), "files": int(progress.get("files_done") or 0),
        })
    return out


# --- nodes -------------------------------------------------------------------


def save_node(name: str, **fields: Any) -> None:
    Node._get_collection().update_one({"_id": name}, {"$set": fields}, upsert=True)


def all_nodes() -> list[dict[str, Any]]:
    return [plain(d, NodeRecord) for d in Node._get_collection().find({})]


# --- admin policy ------------------------------------------------------------


def get_policy() -> dict[str, Any]:
    return plain(Policy._get_collection().find_one({"_id": "cluster"}) or {}, PolicyRecord)


def set_policy(**fields: Any) -> None:
    Policy._get_collection().update_one({"_id": "cluster"}, {"$set": fields}, upsert=True)



# --- HTTP API tokens -----------------------------------------------------------


def token_record(uid: int) -> dict[str, Any] | None:
    doc = ApiToken._get_collection().find_one({"_id": uid})
    return None if doc is None else plain(doc, TokenRecord)


def set_token(uid: int, user: str, generation: int) -> None:
    """The user's token generation: tokens signed for another one are refused (cm.api.tokens)."""
    ApiToken._get_collection().update_one(
        {"_id": uid}, {"$set": {"user": user, "generation": generation}, "$unset": {"hash": ""}}, upsert=True)
