"""What is read from MongoDB, typed: every document passes through one of these Structs on its way out of
cm.store, so no driver type (``bson.int64.Int64`` for a number past 32 bits, anything else a stored value
may decode to) reaches the head, its replies or their encoders.

Each Struct mirrors a document of cm.store.documents (tests/unit/test_records.py checks that they declare
the same fields); the maps the documents leave untyped (a job's ``sync``, ``progress``, ``labels``) are
typed here. Integers are 64-bit, as MongoDB stores them. ``plain`` hands the head the record as builtins
(the head keeps its records as dicts, cm.head.records), with a key for every field.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta, Struct, field

Int = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]  # what a BSON integer holds


class RecordError(ValueError):
    """A stored document that does not fit its record type: the document and field are named."""


class SlotRecord(Struct):
    node: str
    rank: Int
    cpus: Int
    mem_mb: Int
    role: str = "run"
    started: bool = False
    ended: bool = False
    state: str = ""
    exit_code: Int = 0


class Location(Struct, omit_defaults=True):
    """One side of a sync: a partition or a node, and a path."""

    path: str
    partition: str | None = None
    node: str | None = None


class SyncOptionsRecord(Struct):
    delete: bool = False
    dry_run: bool = False
    checksum: bool = False
    exclude: list[str] = []
    bwlimit: Int | float | None = None  # bytes per second
    policy: str = "size-balanced"
    streams: Int = 4
    chunk_size: Int = 64 << 20
    owners: bool = False
    hard_links: bool = True
    xattrs: bool = True
    acls: bool = True


class SyncRecord(Struct, omit_defaults=True):
    """A sync's sides and options; empty ({}) for a command job."""

    src: Location | None = None
    dst: Location | None = None
    options: SyncOptionsRecord | None = None
    nonce: str | None = None  # hex: with the head's transfer secret it gives the run keys (cm.keys.data_plane_key)
    transport: str | None = None


class ProgressRecord(Struct):
    """A sync's counters, summed over its sender ranks; ``stats``: their final counters (cm.protocol.SyncStats,
    summed), once reported."""

    bytes_done: Int = 0
    bytes_total: Int = 0
    files_done: Int = 0
    files_total: Int = 0
    rate: float = 0.0
    stats: dict[str, Int | float] = {}


class JobRecord(Struct):
    id: Int = field(name="_id")
    name: str
    user: str
    uid: Int
    gid: Int
    kind: str
    state: str
    partition: str
    nodes: Int
    time_limit: float
    submitted: float
    priority: Int = 0
    procs: Int = 1
    cpus: Int = 1
    mem_mb: Int = 0
    cwd: str = "/"
    argv: list[str] = []
    env: list[str] = []
    stdout: str = ""
    stderr: str = ""
    requeue: bool = False
    dispatched: float | None = None
    started: float | None = None
    ended: float | None = None
    exit_code: Int | None = None
    reason: str = ""
    cancel_requested: bool = False
    slots: list[SlotRecord] = []
    sync: SyncRecord = field(default_factory=SyncRecord)
    progress: ProgressRecord = field(default_factory=ProgressRecord)
    runs: Int = 0
    restarts: Int = 0
    labels: dict[str, str] = {}
    idempotency_key: str | None = None
    notify: list[str] = []
    notify_on: list[str] = []
    notify_error: str = ""


class NodeRecord(Struct):
    id: str = field(name="_id")
    partition: str
    cpus: Int
    mem_mb: Int
    state: str = "DOWN"
    drain: bool = False
    reason: str = ""
    transfer_addr: str = ""
    data_root: str = ""
    version: str = ""
    incarnation: str = ""
    last_seen: float | None = None


class CounterRecord(Struct):
    id: str = field(name="_id")
    seq: Int = 0


class PolicyRecord(Struct):
    id: str = field(name="_id", default="cluster")
    blocked_users: list[str] = []
    block_all: bool = False


class IntercomKeyRecord(Struct):
    id: str = field(name="_id")
    job_id: Int
    run: Int
    key: str
    value: str = ""
    version: Int = 1


class TokenRecord(Struct):
    id: Int = field(name="_id")  # uid
    user: str
    generation: Int = 0


R = TypeVar("R", bound=Struct)


def typed(doc: Any, record: type[R]) -> R:
    """A stored document as its record; RecordError naming the document and the field that does not fit."""
    try:
        return msgspec.convert(doc, record)
    except msgspec.ValidationError as exc:
        ident = doc.get("_id") if isinstance(doc, dict) else None
        raise RecordError(f"stored {record.__name__} {ident!r} does not fit its type: {exc}") from None


def plain(doc: Any, record: type[Struct]) -> dict[str, Any]:
    """A stored document as builtins of exactly the types its record declares."""
    return msgspec.to_builtins(typed(doc, record))
