"""The HTTP API's bodies, one msgspec Struct each: what is decoded (and so validated) on the way in,
and what /openapi.json says (msgspec.json.schema). Names end in what they are: ...Job for submissions,
...View for what the API answers with.

What the API sends the head is made of the protocol's request types (cm.protocol): the submission and
admin bodies are built from their fields, so one declaration gives the wire protocol, the HTTP body and
the OpenAPI schema. The job and node views are the head's own (cm.protocol's JobView, TransferView,
NodeView: what it answers info with). Only what HTTP alone has (answers, errors) is declared here.
"""

from __future__ import annotations

from typing import Any, Literal, Union, get_args

import msgspec
from msgspec import NODEFAULT, Struct

from cm.protocol import Control, JobView, Message, NodeView, SubmitCommand, SubmitSync, SyncOptions


def _body(name: str, doc: str, *sources: type[Struct], drop: tuple[str, ...] = (), **config: Any) -> type[Struct]:
    """An HTTP body made of the fields of the protocol's request types (``sources``), less ``drop``: the same
    declarations, so the same limits and the same schema, with HTTP's own tag and no unknown fields."""
    fields: list[tuple] = []
    drop += tuple(Message.__struct_fields__)  # a request's envelope (v, id) is the head's, not the body's
    for source in sources:
        for f in msgspec.structs.fields(source):
            if f.name in drop:
                continue
            if f.default is not NODEFAULT:
                fields.append((f.name, f.type, f.default))
            elif f.default_factory is not NODEFAULT:
                fields.append((f.name, f.type, msgspec.field(default_factory=f.default_factory)))
            else:
                fields.append((f.name, f.type))
    cls = msgspec.defstruct(name, fields, module=__name__, kw_only=True, forbid_unknown_fields=True, **config)
    cls.__doc__ = doc
    return cls


# The Idempotency-Key comes in its header, not in the body.
CommandJob = _body(
    "CommandJob", "A command job: every cmrun option (cm.protocol.SubmitCommand). The job's environment is `env` "
    "only (a program's own environment is not copied, unlike cmrun's).",
    SubmitCommand, drop=("idempotency_key",), tag="command", tag_field="type")
# cmsync's options sit beside src and dst, not in an "options" map (CONTRACT.md)
SYNC_OPTIONS = tuple(SyncOptions.__struct_fields__)
SyncJob = _body(
    "SyncJob", "A sync job: every cmsync option (cm.protocol.SubmitSync, with SyncOptions' fields beside src and "
    "dst).", SubmitSync, SyncOptions, drop=("idempotency_key", "options"), tag="sync", tag_field="type")
JobSubmission = Union[CommandJob, SyncJob]  # type: ignore[valid-type]

ADMIN_ACTIONS: tuple[str, ...] = get_args(next(f.type for f in msgspec.structs.fields(Control) if f.name == "action"))
AdminRequest = _body(
    "AdminRequest", "What an admin operation acts on (cm.protocol.Control, the action is the path's): "
    "hold/release/priority name `job_id` (priority also `value`), drain/resume a `node` (drain with a `reason`), "
    "block/unblock a `user` (empty or \"ALL\": everyone).", Control, drop=("action", "token"))


def submitted(body: Any, idempotency_key: str | None = None) -> SubmitCommand | SubmitSync:
    """The job a submit request carries (cm.protocol.Submit.job) for an HTTP body."""
    fields = msgspec.structs.asdict(body)
    if idempotency_key is not None:
        fields["idempotency_key"] = idempotency_key
    if isinstance(body, SyncJob):
        options = SyncOptions(**{k: fields.pop(k) for k in SYNC_OPTIONS})
        return SubmitSync(**fields, options=options)
    return SubmitCommand(**fields)


def admin_request(action: str, body: Any) -> Control:
    """The control request for an admin path and body."""
    return Control(action=action, **msgspec.structs.asdict(body))  # type: ignore[arg-type]


class Submitted(Struct):
    id: int


class UserTotal(Struct):
    user: str
    jobs: int
    bytes: int  # moved by the user's syncs
    files: int
    node_hours: float


class PairTotal(Struct):
    pair: str  # SRC->DST partitions of syncs (a node where no partition was named), a command's partition
    jobs: int
    bytes: int
    files: int
    node_hours: float


class Totals(Struct):
    users: list[UserTotal]
    pairs: list[PairTotal]


class JobList(Struct):
    """Jobs; with ended_after or ended_before (accounting, as cmacct): finished jobs that ended in that window,
    oldest end first, with totals; ``truncated``: more ended then than one answer lists (100,000)."""

    jobs: list[JobView]
    totals: Totals | None = None
    truncated: bool = False
    ended_after: float | None = None
    ended_before: float | None = None


class NodeList(Struct):
    nodes: list[NodeView]


class FileLine(Struct, forbid_unknown_fields=False):
    """One line of a sync's per-file report (cm.transfer.report): what was done to one path."""

    action: Literal["created", "updated", "deleted", "skipped", "failed"]
    path: str
    dry_run: bool = False
    kind: str | None = None
    size: int | None = None
    xxh3: str | None = None
    chunks_xxh3: list[str] | None = None
    chunks_resumed: int | None = None
    link: str | None = None
    target: str | None = None
    what: str | None = None
    reason: str | None = None


class FileList(Struct):
    """A page of the report; `next` is the offset of the next page (null: the last page)."""

    job_id: int
    files: list[FileLine]
    next: int | None


class CancelResult(Struct):
    state: str


class ErrorBody(Struct):
    error: str


class Version(Struct):
    version: str
    api_versions: list[str]

