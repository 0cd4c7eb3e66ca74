"""The wire protocol: every message type, its schema, and encode/decode.

A message on the wire is a msgpack map ``{"v": VERSION, "t": TYPE, "id": MSGID,
...fields}``. Each type below is a frozen dataclass; its annotations are its
schema. ``decode`` turns bytes into one of these or raises ProtocolError, so
nothing that does not fit a schema gets past the socket. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

VERSION = 1
MAX_MESSAGE = 16 * 1024 * 1024


class ProtocolError(ValueError):
    """Bytes that are not a valid cm message."""


def new_id() -> str:
    return os.urandom(8).hex()


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""
    id: str = field(default_factory=new_id, kw_only=True)


# One node's share of one run of a job: (job_id, run, role, rank). A node may hold several
# shares of a job (a sync's sender and receiver on one node), so they are told apart by all four.
Share = tuple[int, int, str, int]


# --- node -> head -----------------------------------------------------------


@dataclass(frozen=True)
class Hello(Message):
    TYPE = "hello"
    node: str
    partition: str
    cpus: int
    mem_mb: int
    version: str
    running: list[int]
    transfer_addr: str  # host:port of this node's mover
    data_root: str
    incarnation: str  # new on every daemon start: tells a reconnect from a restart
    shares: list[Share] = field(default_factory=list)  # running here
    ending: list[Share] = field(default_factory=list)  # ended here, the end not yet acknowledged


@dataclass(frozen=True)
class Heartbeat(Message):
    TYPE = "heartbeat"
    node: str
    running: list[int]
    shares: list[Share] = field(default_factory=list)  # as in Hello: the head checks them against its slots
    ending: list[Share] = field(default_factory=list)


@dataclass(frozen=True)
class JobStarted(Message):
    TYPE = "job_started"
    job_id: int
    node: str
    run: int  # which dispatch of the job (a requeued job runs again)
    role: str = ""  # run, src or dst; "" (older nodes): every share of the job on the node
    rank: int = 0


@dataclass(frozen=True)
class JobEnded(Message):
    """A job's processes on one node are gone; ``state`` is what ended them."""

    TYPE = "job_ended"
    job_id: int
    node: str
    run: int
    state: str  # a final JobState name
    exit_code: int
    reason: str = ""
    role: str = ""  # as in JobStarted
    rank: int = 0


@dataclass(frozen=True)
class Progress(Message):
    TYPE = "progress"
    job_id: int
    node: str
    run: int
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    rate: float
    stats: dict[str, Any] = field(default_factory=dict)  # final counters of a sync part
    rank: int = 0  # the sender's rank: a node may send more than one rank of a sync


# --- head -> node -----------------------------------------------------------


@dataclass(frozen=True)
class Welcome(Message):
    TYPE = "welcome"
    heartbeat_interval: float
    kill: list[int]  # jobs the node reported that must not run (reconciliation)


@dataclass(frozen=True)
class RunJob(Message):
    """Start this node's share of a job. Idempotent: keyed by (job_id, run, role, rank) from the spec."""

    TYPE = "run_job"
    job_id: int
    spec: dict[str, Any]


@dataclass(frozen=True)
class KillJob(Message):
    """Stop a job's processes here and report them with ``state``. Idempotent."""

    TYPE = "kill_job"
    job_id: int
    state: str  # the final state to report: CANCELLED, TIMEOUT, NODE_FAIL (FAILED: a sync lost its receiver)
    reason: str = ""
    run: int = 0  # 0: every run; else only that run (a late kill of run 1 must not stop run 2)
    role: str = ""  # "": every share of the job here; else only that role ...
    rank: int = -1  # ... and rank (-1: any)


# --- both ways --------------------------------------------------------------


@dataclass(frozen=True)
class Ack(Message):
    TYPE = "ack"
    ref: str


@dataclass(frozen=True)
class Error(Message):
    TYPE = "error"
    ref: str
    message: str


# --- client <-> head (Unix socket) ------------------------------------------


@dataclass(frozen=True)
class Request(Message):
    """A command from a client. ``op`` names the operation, ``args`` its arguments."""

    TYPE = "request"
    op: str
    args: dict[str, Any]


@dataclass(frozen=True)
class Reply(Message):
    TYPE = "reply"
    ok: bool
    data: Any = None
    error: str = ""


TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (Hello, Heartbeat, JobStarted, JobEnded, Progress, Welcome, RunJob, KillJob, Ack, Error, Request, Reply)
}


def _conforms(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is tuple:  # a fixed-length array on the wire (msgpack gives a list)
        items = typing.get_args(hint)
        return (isinstance(value, (list, tuple)) and len(value) == len(items)
                and all(_conforms(v, h) for v, h in zip(value, items)))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_conforms(k, key) and _conforms(v, item) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _tuples(value: Any, hint: Any) -> Any:
    """Arrays that the schema calls tuples become tuples (hashable, as they were sent)."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple(value)
    if origin is list and typing.get_origin(typing.get_args(hint)[0]) is tuple:
        return [tuple(v) for v in value]
    return value


_HINTS = {cls: typing.get_type_hints(cls) for cls in TYPES.values()}
_FIELDS = {cls: [f for f in dataclasses.fields(cls) if f.name != "id"] for cls in TYPES.values()}


def encode(msg: Message) -> bytes:
    body = {"v": VERSION, "t": msg.TYPE, "id": msg.id}
    for f in _FIELDS[type(msg)]:
        body[f.name] = getattr(msg, f.name)
    return msgpack.packb(body, use_bin_type=True)


def decode(data: bytes) -> Message:
    """Parse and validate one message; raise ProtocolError with the reason."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"not msgpack: {exc.__class__.__name__}") from None
    if not isinstance(body, dict):
        raise ProtocolError("message is not a map")
    if body.get("v") != VERSION:
        raise ProtocolError(f"protocol version {body.get('v')!r}, expected {VERSION}")
    cls = TYPES.get(body.get("t"))  # type: ignore[arg-type]
    if cls is None:
        raise ProtocolError(f"unknown message type {body.get('t')!r}")
    msg_id = body.get("id")
    if not isinstance(msg_id, str) or not msg_id:
        raise ProtocolError("message id missing")
    hints = _HINTS[cls]
    kwargs: dict[str, Any] = {}
    for f in _FIELDS[cls]:
        if f.name not in body:
            if f.default is dataclasses.MISSING:
                raise ProtocolError(f"{cls.TYPE}: field {f.name!r} missing")
            continue
        value = body[f.name]
        if not _conforms(value, hints[f.name]):
            raise ProtocolError(f"{cls.TYPE}: field {f.name!r} has the wrong type")
        kwargs[f.name] = _tuples(value, hints[f.name])
    extra = set(body) - {"v", "t", "id"} - {f.name for f in _FIELDS[cls]}
    if extra:
        raise ProtocolError(f"{cls.TYPE}: unknown fields {sorted(extra)}")
    return cls(id=msg_id, **kwargs)


# --- framing on stream sockets (the client's Unix socket) --------------------

FRAME_HEADER = 4


def frame(msg: Message) -> bytes:
    """A message prefixed by its length (4 bytes, big-endian)."""
    body = encode(msg)
    return len(body).to_bytes(FRAME_HEADER, "big") + body


def unframe(buffer: bytearray, limit: int = MAX_MESSAGE) -> bytes | None:
    """Take one whole frame's body off the front of buffer, or None if incomplete.

    A frame announcing more than ``limit`` bytes raises ProtocolError before
    any of it is buffered.
    """
    if len(buffer) < FRAME_HEADER:
        return None
    size = int.from_bytes(buffer[:FRAME_HEADER], "big")
    if size > limit:
        raise ProtocolError(f"a request of {size} bytes exceeds the limit of {limit}")
    if len(buffer) < FRAME_HEADER + size:
        return None
    body = bytes(buffer[FRAME_HEADER : FRAME_HEADER + size])
    del buffer[: FRAME_HEADER + size]
    return body


# --- intercom: a job's processes, through their node daemons and the head -------------------------
# (cm.node.intercom forwards what a job's processes ask; cm.head.intercom answers and routes.)
# Node -> head requests carry the asking process's job, run and rank; the head checks that the node
# holds that rank of that run. ``ref`` ties the head's IntercomAnswer to the node's request.


@dataclass(frozen=True)
class IntercomAsk(Message):
    """What every request of a job's process carries: the node, and the rank of a run of a job it speaks for."""

    node: str
    job_id: int
    run: int
    rank: int


@dataclass(frozen=True)
class IntercomPut(IntercomAsk):
    TYPE = "ic_put"
    key: str
    value: str


@dataclass(frozen=True)
class IntercomGet(IntercomAsk):
    """Answered with the value at once, or with kind "absent": the node then waits for the IntercomUpdate."""

    TYPE = "ic_get"
    key: str


@dataclass(frozen=True)
class IntercomFence(IntercomAsk):
    """Rank ``rank`` reached the job's fence number ``epoch`` (1, 2, ...); repeats change nothing."""

    TYPE = "ic_fence"
    epoch: int


@dataclass(frozen=True)
class IntercomSend(IntercomAsk):
    """A command to some of the job's processes (``ranks``: what the sender's condition ``to`` selected)."""

    TYPE = "ic_send"
    command: str
    ranks: list[int]
    to: str = ""  # the condition as written, for messages
    reply: bool = False


@dataclass(frozen=True)
class IntercomDelivered(Message):
    """How an IntercomDeliver went on this node: ranks queued, ranks whose queue was full."""

    TYPE = "ic_delivered"
    node: str
    ref: str
    count: int
    refused: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class IntercomAnswer(Message):
    """The head's answer to an intercom request (``ref``): ok with a value/version/count, or an error.

    ``kind`` says which: "" done, "absent" (a get whose key is not there yet), "limit", "ended", "error".
    """

    TYPE = "ic_answer"
    ref: str
    kind: str = ""
    error: str = ""
    value: str = ""
    version: int = 0
    count: int = 0


@dataclass(frozen=True)
class IntercomUpdate(Message):
    """A key of a job's run was put: to every node of the job (waiting gets, subscribers)."""

    TYPE = "ic_update"
    job_id: int
    run: int
    key: str
    value: str
    version: int


@dataclass(frozen=True)
class IntercomFenceDone(Message):
    TYPE = "ic_fence_done"
    job_id: int
    run: int
    epoch: int


@dataclass(frozen=True)
class IntercomDeliver(Message):
    """Queue ``command`` for these ranks of a job here; answered with IntercomDelivered (ref = this id)."""

    TYPE = "ic_deliver"
    job_id: int
    run: int
    ranks: list[int]
    command: str
    sender: str  # NODE/RANK
    reply: bool = False


INTERCOM_TO_HEAD = (IntercomPut, IntercomGet, IntercomFence, IntercomSend, IntercomDelivered)
INTERCOM_TO_NODE = (IntercomAnswer, IntercomUpdate, IntercomFenceDone, IntercomDeliver)
TYPES.update({cls.TYPE: cls for cls in (*INTERCOM_TO_HEAD, *INTERCOM_TO_NODE)})
_HINTS.update({cls: typing.get_type_hints(cls) for cls in (*INTERCOM_TO_HEAD, *INTERCOM_TO_NODE)})
_FIELDS.update({cls: [f for f in dataclasses.fields(cls) if f.name != "id"]
                for cls in (*INTERCOM_TO_HEAD, *INTERCOM_TO_NODE)})
