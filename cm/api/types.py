"""The HTTP API's bodies, one msgspec Struct each: what is decoded (and so validated) on the way in,
and what /openapi.json says (msgspec.json.schema). Names end in what they are: ...Job for submissions,
...View for what the API answers with."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta, Struct

Count = Annotated[int, Meta(ge=1, le=4096)]
Text = Annotated[str, Meta(max_length=4096)]
Name = Annotated[str, Meta(max_length=200)]
LabelKey = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_/-]{0,62}$")]
Labels = Annotated[dict[LabelKey, Annotated[str, Meta(max_length=256)]], Meta(max_length=32)]
TimeLimit = Annotated[str, Meta(max_length=32, description="Slurm's forms: MM, MM:SS, HH:MM:SS, D-HH")]
Location = Annotated[str, Meta(max_length=4096, pattern=r"^[^:]+:.*$",
                               description="PARTITION:/path or NODE:/path inside that partition's storage")]


class CommandJob(Struct, tag="command", tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """A command job: every cmrun option. The job's environment is `env` only (a program's own
    environment is not copied, unlike cmrun's)."""

    argv: Annotated[list[Text], Meta(min_length=1, max_length=4096)]
    nodes: Count = 1
    procs: Count = 1
    cpus: Annotated[int, Meta(ge=1, le=65536)] | None = None
    mem_mb: Annotated[int, Meta(ge=0, le=1 << 30)] = 0
    time: TimeLimit | None = None
    name: Name | None = None
    partition: Name | None = None
    stdout: Text = ""
    stderr: Text = ""
    requeue: bool = False
    hold: bool = False
    cwd: Annotated[str, Meta(max_length=4096, pattern="^/")] = "/"
    env: Annotated[list[Annotated[str, Meta(max_length=65536, pattern=r"^[^=].*=")]], Meta(max_length=4096)] = []
    labels: Labels = {}

    def head_args(self) -> dict[str, Any]:
        args = msgspec.structs.asdict(self)
        return {**args, "kind": "command"}


class SyncJob(Struct, tag="sync", tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """A sync job: every cmsync option."""

    src: Location
    dst: Location
    nodes: Count = 1
    delete: bool = False
    dry_run: bool = False
    checksum: bool = False
    exclude: Annotated[list[Text], Meta(max_length=1024)] = []
    bwlimit: Annotated[int, Meta(ge=1, description="bytes per second")] | None = None
    transport: Literal["tcp", "rdma"] = "tcp"
    policy: Literal["size-balanced", "round-robin"] = "size-balanced"
    time: TimeLimit | None = None
    name: Name | None = None
    labels: Labels = {}

    def head_args(self) -> dict[str, Any]:
        options = {k: getattr(self, k) for k in ("delete", "dry_run", "checksum", "exclude", "bwlimit", "transport",
                                                  "policy")}
        return {"kind": "sync", "src": self.src, "dst": self.dst, "nodes": self.nodes, "time": self.time,
                "name": self.name, "options": options, "labels": self.labels}


JobSubmission = Union[CommandJob, SyncJob]


class Submitted(Struct):
    id: int


class TransferView(Struct):
    """A sync job's counters (summed over its nodes); `rate` is bytes/s, the effective rate once final."""

    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    files_skipped: int
    files_deleted: int
    retries: int
    errors: int
    rate: float
    message: str
    started: float | None
    ended: float | None
    stats: dict[str, Any]


class JobView(Struct):
    """A job as `cminfo --json` shows it, plus labels and, for sync jobs, transfer counters."""

    id: int
    name: str
    user: str
    type: Literal["command", "sync"]
    state: str
    nodes: list[str]
    exit_code: int | None
    progress: float | None
    submitted: str | None
    started: str | None
    ended: str | None
    elapsed: float | None
    partition: str | None
    reason: str
    time_limit: float | None
    priority: int
    transfer: TransferView | None
    labels: dict[str, str]
    num_nodes: int | None
    times: dict[str, float | None]
    command: str | None = None
    workdir: str | None = None
    env: list[str] | None = None


class JobList(Struct):
    jobs: list[JobView]


class NodeView(Struct):
    name: str
    partition: str
    state: str
    cpus: int
    cpus_free: int
    mem_mb: int
    mem_free_mb: int
    reason: str = ""


class NodeList(Struct):
    nodes: list[NodeView]


class CancelResult(Struct):
    state: str


class AdminRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """What an admin operation acts on: hold/release/priority name `job_id` (priority also `value`),
    drain/resume a `node` (drain with a `reason`), block/unblock a `user` (absent or "ALL": everyone)."""

    job_id: Annotated[int, Meta(ge=0, le=1 << 62)] | None = None
    value: Annotated[str, Meta(max_length=16)] | Annotated[int, Meta(ge=-1000, le=1000)] | None = None
    node: Name | None = None
    reason: Text = ""
    user: Annotated[str, Meta(max_length=64)] | None = None


class ErrorBody(Struct):
    error: str


class Version(Struct):
    version: str
    api_versions: list[str]


ADMIN_ACTIONS = ("hold", "release", "priority", "drain", "resume", "block", "unblock")
