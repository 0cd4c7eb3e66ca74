"""The head's job record: what is stored (cm.store.documents declares the same fields) and what is memory only.

A record is the stored document as pymongo returns it, a plain dict, typed
here so every key has one declaration. Keys marked *memory* are never
written: they are rebuilt from what is stored, or by the next event.
"""

from __future__ import annotations

from typing import Any, TypedDict


class SlotRecord(TypedDict):
    """One node's share of one run of a job (documents.Slot)."""

    node: str
    rank: int
    role: str  # run, src or dst
    cpus: int
    mem_mb: int
    started: bool
    ended: bool
    state: str  # the JobState it ended in, "" while it has not
    exit_code: int


class SyncRecord(TypedDict, total=False):
    src: dict[str, str]  # {"partition" | "node": name, "path": path}
    dst: dict[str, str]
    options: dict[str, Any]  # delete, dry_run, checksum, exclude, bwlimit, policy, streams, chunk_size, owners
    token: str  # hex; each run's data-plane token is derived from it
    transport: str  # tcp or rdma


class Job(TypedDict, total=False):
    """A job (documents.Job). Stored unless marked memory."""

    _id: int
    name: str
    user: str
    uid: int
    gid: int
    kind: str  # command or sync
    state: str  # a JobState value
    priority: int
    partition: str
    nodes: int
    procs: int
    cpus: int
    mem_mb: int
    time_limit: float
    cwd: str
    argv: list[str]
    env: list[str]
    stdout: str
    stderr: str
    requeue: bool
    submitted: float
    dispatched: float | None  # when the current run was dispatched
    started: float | None
    ended: float | None
    exit_code: int | None
    reason: str
    cancel_requested: bool  # cancelled while running: CANCELLED once its shares are gone
    slots: list[SlotRecord]
    sync: SyncRecord
    progress: dict[str, Any]  # bytes_done, bytes_total, files_done, files_total, rate, stats: merged over nodes
    runs: int
    restarts: int
    # memory only
    pending_reason: str  # why a waiting job waits, from the last scheduler pass
    src_sent: bool  # this run's senders were told to start (its receivers had started)
    node_progress: dict[str, dict[str, Any]]  # "node/rank" -> its last progress report


MEMORY_ONLY = frozenset({"pending_reason", "src_sent", "node_progress"})
