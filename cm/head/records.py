"""The head's job record: exactly what is stored (cm.store.documents declares the same fields).

A record is the stored document as cm.store hands it: a plain dict of
builtins (the head reads thousands per scheduler pass), checked against its
typed record (cm.store.records) on the way out of the store, so no driver
type reaches the head; typed here for the type checker. What the head knows of a job only in memory (why it waits,
whether its senders were told to start, each rank's progress) is kept
beside the records, in ``JobTable``, never in them.
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
    """A job (documents.Job)."""

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
    # bytes_done, bytes_total, files_done, files_total, rate, stats: merged over ranks; kept in memory while
    # the sync runs, stored when it ends
    progress: dict[str, Any]
    runs: int
    restarts: int
    labels: dict[str, str]  # e.g. a workflow's name and namespace (--label, the HTTP API)
    idempotency_key: str  # a repeated submit with this key from the same uid gets this job
    notify: list[str]  # webhook URLs (--notify) and the events they are told of (cm.head.notify)
    notify_on: list[str]
    notify_error: str  # deliveries that failed for good
