"""The wire protocol: every message type, its schema, and encode/decode.

A message on the wire is a msgpack map ``{"t": TYPE, "v": VERSION, "id": MSGID,
...fields}``. Each type below is a frozen ``msgspec.Struct``; its declaration
is its schema, and ``decode`` validates against it, so nothing that does not
fit gets past the socket: a bad message raises ``ProtocolError`` naming the
field. No pickle anywhere.

The payloads are typed too:

- ``RunJob.spec`` is a ``NodeJob``: ``CommandShare`` (role ``run``),
  ``SyncSource`` (``src``: its ``SourceTransfer`` becomes the sender's
  ``cm.transfer.spec.Spec``) or ``SyncDestination`` (``dst``), told apart by
  the ``role`` field on the wire.
- ``Progress.stats`` is a ``SyncStats`` (a sender's final counters) or None.
- A client's request is one of ``Request``, a union of Messages tagged by
  their operation (``t``), decoded and validated in one stage like any
  other message: ``Submit`` (its ``job`` a ``SubmitCommand`` or a
  ``SubmitSync``, told apart by ``kind``), ``Cancel``, ``Info``, ``Wait``,
  ``Control``, ``Delete``, ``Token``, ``Files``, ``Metrics``, ``Ping``,
  ``Stats``. These are public types with documented fields and limits
  (``msgspec.Meta``): the HTTP API (cm.api.types) derives its bodies from
  them and publishes them with ``msgspec.json.schema``.
- ``Error.code`` and ``Reply.code`` are an ``ErrorCode``: programs act on the
  code, never on the message text.
- The intercom's ``Intercom*`` messages carry what a job's processes ask of
  each other between node daemons and the head (cm.node.intercom,
  cm.head.intercom); ``IntercomAnswer.code`` is an ``ErrorCode`` too.
"""

import enum
import os
import re
import time
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Union

import msgspec
from msgspec import Meta, Struct, field

from cm import __version__, framing
from cm.states import JobState

VERSION = 3  # 2: msgspec Structs, typed job specs, progress counters, request arguments, error codes; 3: one
# message per client operation (Request), no op + args
MAX_MESSAGE = framing.MAX_FRAME
FRAME_HEADER = framing.FRAME_HEADER


class ProtocolError(ValueError):
    """Bytes that are not a valid cm message."""


class UnknownType(ProtocolError):
    """A message whose type (``t``: for a client, the operation) is none of ``TYPES``."""


class Misfit(ProtocolError):
    """A client's request of a known operation whose fields do not fit it (the message names the field)."""


class OtherVersion(ProtocolError):
    """A message of another protocol version: refused as such, whatever its fields.

    What every version keeps, so that two versions can still say who they are to each other: the
    message's ``t`` and ``v``, a Hello's ``node`` and ``version`` (the sender's cm release), an Error's
    ``message``. ``envelope`` holds those of the message (None where it had none, or not of that type).
    """

    def __init__(self, envelope: "_Envelope") -> None:
        super().__init__(f"protocol version {envelope.v!r}, expected {VERSION}")
        self.envelope = envelope


def version_refusal(node: str, release: str | None, protocol: object) -> str:
    """What the head says of a node of another version, naming both (docs/DEPLOY.md, upgrades)."""
    theirs = f"runs cm {release} (protocol {protocol})" if release else f"speaks protocol {protocol}"
    older = isinstance(protocol, int) and protocol < VERSION
    return (f"node {node} {theirs}; this head runs cm {__version__} (protocol {VERSION}): "
            f"upgrade the {'node' if older else 'head'}")


def new_id() -> str:
    return os.urandom(8).hex()


class ErrorCode(enum.StrEnum):
    """What kind of error an ``Error`` or a refused ``Reply`` reports."""

    BAD_MESSAGE = "bad_message"  # did not fit its schema, or made no sense here
    UNKNOWN_NODE = "unknown_node"  # the head does not know the sender: it must say hello again
    UNKNOWN_OPERATION = "unknown_operation"
    REFUSED = "refused"  # understood, and not allowed or not possible
    NOT_FOUND = "not_found"  # no such job or node
    FORBIDDEN = "forbidden"  # someone else's job, or an administrator's operation
    CONFLICT = "conflict"  # the job is in the wrong state for this (still active, already final)
    DB_UNAVAILABLE = "db_unavailable"  # the head waits for its database: try again shortly
    INTERNAL = "internal"  # a bug in the head; see its log
    # the intercom's (cm.intercom turns each into an exception a job's process can catch)
    LIMIT = "limit"  # a size or count over its setting (CM_INTERCOM_*)
    ENDED = "ended"  # the job, or this run of it, is over
    TIMEOUT = "timeout"  # the caller's own timeout passed first
    HEAD_UNAVAILABLE = "head_unavailable"  # the node could not hear from the head in time: try again


COUNT_MAX = (1 << 63) - 1  # every counter is 64-bit, as MongoDB stores it; sums of counters stop here
JobId = Annotated[int, Meta(ge=0, le=COUNT_MAX)]
Id = Annotated[int, Meta(ge=0, le=(1 << 32) - 1)]  # a uid or gid
Count = Annotated[int, Meta(ge=0, le=COUNT_MAX)]


class Message(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="t"):
    TYPE: ClassVar[str] = ""
    v: int = VERSION
    id: Annotated[str, Meta(min_length=1, max_length=64)] = field(default_factory=new_id)


ANY_RUN, ANY_ROLE, ANY_RANK = 0, "", -1  # a ShareKey's wildcards (KillJob's defaults): read only by matches()


class ShareKey(NamedTuple):
    """One node's share of one run of a job. A node may hold several shares of a job (a sync's sender and
    receiver on one node), so they are told apart by all four. On the wire: an array of the four.

    As a pattern (what a KillJob or a JobStarted names), run ``ANY_RUN`` is any run, role ``ANY_ROLE``
    every share of the job (whatever its rank), rank ``ANY_RANK`` every rank of that role."""

    job_id: int
    run: int
    role: str
    rank: int

    def matches(self, share: "ShareKey") -> bool:
        """Whether ``share`` is one this key names, read as a pattern."""
        return (self.job_id == share.job_id and self.run in (ANY_RUN, share.run)
                and (self.role == ANY_ROLE or (self.role == share.role and self.rank in (ANY_RANK, share.rank))))


# --- what a node runs (RunJob.spec) -----------------------------------------


class ShareSpec(Struct, frozen=True, forbid_unknown_fields=True, tag_field="role"):
    """What every share of a job carries: which run and rank, and who it runs as."""

    ROLE: ClassVar[str] = ""
    KIND: ClassVar[str] = ""
    run: Annotated[int, Meta(ge=1)]  # which dispatch of the job (a requeued job runs again)
    rank: Annotated[int, Meta(ge=0)]
    name: str
    user: str
    uid: Id
    gid: Id
    time_limit: Annotated[float, Meta(gt=0)]  # seconds
    cwd: str

    @property
    def role(self) -> str:
        return self.ROLE

    @property
    def kind(self) -> str:
        return self.KIND


class CommandShare(ShareSpec, tag="run"):
    """A command job's processes on one node."""

    ROLE, KIND = "run", "command"
    argv: Annotated[list[str], Meta(min_length=1)]
    env: list[str]  # NAME=value
    procs: Annotated[int, Meta(ge=1)]  # processes on this node
    nnodes: Annotated[int, Meta(ge=1)]
    nodelist: list[str]
    stdout: str  # pattern; "" for the default
    stderr: str
    cpus: Annotated[int, Meta(ge=1)]


class SourceTransfer(Struct, frozen=True, forbid_unknown_fields=True):
    """One sender rank's transfer; with the node's data root it is the sender's ``Spec``."""

    transfer_id: str
    token: str
    src_path: str
    dst_host: str
    dst_port: Annotated[int, Meta(ge=0, lt=65536)]
    rank: Annotated[int, Meta(ge=0)]
    nranks: Annotated[int, Meta(ge=1)]
    transport: Literal["tcp", "rdma"]  # no default: a spec that lost it is refused, not run over TCP
    policy: Literal["round-robin", "size-balanced"]
    delete: bool
    dry_run: bool
    checksum: bool
    exclude: list[str]
    bwlimit: Annotated[float, Meta(gt=0)] | None  # bytes per second
    streams: Annotated[int, Meta(ge=1)]
    chunk_size: Annotated[int, Meta(gt=0)]
    owners: bool  # keep owners and groups (root's and operators' syncs)
    hard_links: bool = True  # keep hard links within the tree (cmsync --no-hard-links: not)
    xattrs: bool = True  # keep extended attributes (--no-xattrs: not)
    acls: bool = True  # keep POSIX ACLs (--no-acls: not)


class SyncSource(ShareSpec, tag="src"):
    """A sync's sender on one node."""

    ROLE, KIND = "src", "sync"
    transfer: SourceTransfer


class DestinationTransfer(Struct, frozen=True, forbid_unknown_fields=True):
    """What a node's mover needs to accept one run of a sync."""

    transfer_id: str
    token: str
    dst_path: str
    owners: bool


class SyncDestination(ShareSpec, tag="dst"):
    """A sync's receiver: a registration with the node's mover."""

    ROLE, KIND = "dst", "sync"
    transfer: DestinationTransfer


NodeJob = Union[CommandShare, SyncSource, SyncDestination]


class SyncCounters(Struct, frozen=True):
    """How far a sync has got: a sender rank's progress line (cm.transfer.sender), what its node reports
    (``Progress.counters``), their sum in the job's record, and the first fields of its ``TransferView``.
    ``rate`` is bytes/s."""

    bytes_done: Count
    bytes_total: Count
    files_done: Count
    files_total: Count
    rate: float


class SyncStats(Struct, frozen=True, forbid_unknown_fields=True):
    """A sender's final counters (the last line it prints), summed over ranks by the head."""

    bytes_sent: Count = 0
    files_sent: Count = 0
    files_deleted: Count = 0
    files_skipped: Count = 0
    chunks_resent: Count = 0
    chunks_resumed: Count = 0
    bytes_total: Count = 0
    files_total: Count = 0
    errors: Count = 0  # paths that could not be copied
    vanished: Count = 0  # of them: source files that vanished or kept changing while read
    partial_bytes: Count = 0  # verified bytes of unfinished files, kept at the destination for resuming
    skipped: Count = 0  # paths (or their xattrs, ACLs) not copied, each with its reason in the job's report
    elapsed: Annotated[float, Meta(ge=0)] = 0.0  # seconds


# --- node -> head -----------------------------------------------------------


class Hello(Message, tag="hello"):
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
    shares: list[ShareKey] = []  # running here
    ending: list[ShareKey] = []  # ended here, the end not yet acknowledged


class Heartbeat(Message, tag="heartbeat"):
    TYPE = "heartbeat"
    node: str
    running: list[int]
    shares: list[ShareKey] = []  # as in Hello: the head checks them against its slots
    ending: list[ShareKey] = []


class JobStarted(Message, tag="job_started"):
    TYPE = "job_started"
    job_id: int
    node: str
    run: int  # which dispatch of the job (a requeued job runs again)
    role: str = ""  # run, src or dst; "": every share of the job on the node
    rank: int = 0
    at: float = field(default_factory=time.time)  # when it started, by the node's clock (resends keep it)

    @property
    def share(self) -> ShareKey:
        """Which share started (role "": every share of the job on the node)."""
        return ShareKey(self.job_id, self.run, self.role, self.rank)


class JobEnded(Message, tag="job_ended"):
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
    at: float = field(default_factory=time.time)  # when it ended, by the node's clock: the head may hear of it
    # much later (it was down), and the job's end is this, not then

    @property
    def share(self) -> ShareKey:
        return ShareKey(self.job_id, self.run, self.role, self.rank)


class Progress(Message, tag="progress"):
    TYPE = "progress"
    job_id: int
    node: str
    run: int
    counters: SyncCounters
    stats: SyncStats | None = None  # final counters of a sync part
    rank: int = 0  # the sender's rank: a node may send more than one rank of a sync


# --- head -> node -----------------------------------------------------------


class Welcome(Message, tag="welcome"):
    TYPE = "welcome"
    heartbeat_interval: float
    kill: list[int]  # jobs the node reported that must not run (reconciliation)


class RunJob(Message, tag="run_job"):
    """Start this node's share of a job. Idempotent: keyed by (job_id, run, role, rank) from the spec."""

    TYPE = "run_job"
    job_id: int
    spec: NodeJob

    @property
    def share(self) -> ShareKey:
        return ShareKey(self.job_id, self.spec.run, self.spec.role, self.spec.rank)


class KillJob(Message, tag="kill_job"):
    """Stop a job's processes here and report them with ``state``. Idempotent."""

    TYPE = "kill_job"
    job_id: int
    state: str  # the final state to report: CANCELLED, TIMEOUT, NODE_FAIL (FAILED: a sync lost its receiver)
    reason: str = ""
    run: int = ANY_RUN  # else only that run (a late kill of run 1 must not stop run 2)
    role: str = ANY_ROLE  # else only that role ...
    rank: int = ANY_RANK  # ... and rank

    @property
    def share(self) -> ShareKey:
        """The shares to stop, as a pattern (ShareKey.matches)."""
        return ShareKey(self.job_id, self.run, self.role, self.rank)


# --- both ways --------------------------------------------------------------


class Ack(Message, tag="ack"):
    TYPE = "ack"
    ref: str


class Error(Message, tag="error"):
    TYPE = "error"
    ref: str
    message: str
    code: ErrorCode


# --- client <-> head (Unix socket) ------------------------------------------


class Reply(Message, tag="reply"):
    TYPE = "reply"
    ok: bool
    data: Any = None  # the op's answer: an InfoData for info and wait, a small map of builtins for the others
    error: str = ""
    code: ErrorCode | None = None  # set when not ok


# --- what the head shows of jobs and nodes (info, wait; the HTTP API's views) -------------------------------


class TransferView(SyncCounters):
    """A sync job's counters (summed over its nodes); `rate` is bytes/s, the effective rate once final."""

    files_skipped: Count
    files_deleted: Count
    retries: Count
    errors: Count
    message: str
    skipped: Count  # paths (or their xattrs, ACLs) not copied: the report's "skipped" lines say why
    started: float | None
    ended: float | None
    stats: dict[str, Count | float]  # the senders' final counters (SyncStats' fields), summed; {} until reported


class JobView(Struct):
    """A job as `cminfo --json` shows it, plus labels and, for sync jobs, transfer counters; ``command``,
    ``workdir`` and ``env`` only for one job in detail (``env``: its owner's and the admins' only)."""

    id: JobId
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
    elapsed: float | None  # seconds
    partition: str | None
    reason: str
    time_limit: float | None
    priority: int
    transfer: TransferView | None
    labels: dict[str, str]
    num_nodes: Count | None
    times: dict[str, float | None]  # submitted, started, ended: epoch seconds
    command: str | None = None
    workdir: str | None = None
    env: list[str] | None = None
    dst: str | None = None  # a sync's destination: its partition or node (``partition`` is its source's)
    notify: str | None = None  # the webhook deliveries that failed for good (cm.head.notify)


class NodeView(Struct):
    name: str
    partition: str
    state: str
    cpus: Count
    cpus_free: int
    mem_mb: Count
    mem_free_mb: int
    reason: str = ""


class InfoData(Struct):
    """The answer to info and wait: the nodes, and the jobs asked for (none for ``nodes_only``)."""

    nodes: list[NodeView]
    jobs: list[JobView] = []


# --- intercom: a job's processes, through their node daemons and the head ----
# cm.node.intercom forwards what a job's processes ask; cm.head.intercom answers and routes. Node -> head
# requests carry the asking process's job, run and rank: the head checks that the node holds that rank of
# that run. ``ref`` ties an IntercomAnswer (or IntercomDelivered) to what it answers. Key and value sizes
# are settings (CM_INTERCOM_KEY_BYTES, CM_INTERCOM_VALUE_BYTES), so the head checks those itself.

Rank = Annotated[int, Meta(ge=0)]
Run = Annotated[int, Meta(ge=1)]
KeyText = Annotated[str, Meta(min_length=1)]  # never empty
NodeRanks = Annotated[list[Rank], Meta(max_length=4096)]  # one node's processes of a job (procs <= 4096)


class IntercomAsk(Message, frozen=True):
    """What every request of a job's process carries: the node, and the rank of a run of a job it speaks for."""

    node: str
    job_id: JobId
    run: Run
    rank: Rank


class IntercomPut(IntercomAsk, tag="ic_put"):
    TYPE = "ic_put"
    key: KeyText
    value: str


class IntercomGet(IntercomAsk, tag="ic_get"):
    """Answered with the value at once, or ``absent``: the node then waits for the IntercomUpdate."""

    TYPE = "ic_get"
    key: KeyText


class IntercomFence(IntercomAsk, tag="ic_fence"):
    """Rank ``rank`` reached the job's fence number ``epoch`` (1, 2, ...); repeats change nothing."""

    TYPE = "ic_fence"
    epoch: Annotated[int, Meta(ge=1)]


class IntercomSend(IntercomAsk, tag="ic_send"):
    """A command to some of the job's processes (``ranks``: what the sender's condition ``to`` selected)."""

    TYPE = "ic_send"
    command: str
    ranks: list[Rank]
    to: str = ""  # the condition as written, for messages
    reply: bool = False


class IntercomDelivered(Message, tag="ic_delivered"):
    """How an IntercomDeliver went on this node: ranks queued, ranks whose queue was full."""

    TYPE = "ic_delivered"
    node: str
    ref: str
    count: Count
    refused: NodeRanks = []


class IntercomAnswer(Message, tag="ic_answer"):
    """The head's answer to an intercom request (``ref``): done, ``absent`` (a get whose key is not there
    yet), or refused with ``code`` (LIMIT, ENDED, REFUSED, FORBIDDEN, DB_UNAVAILABLE, INTERNAL) and why."""

    TYPE = "ic_answer"
    ref: str
    code: ErrorCode | None = None  # None: done
    error: str = ""
    absent: bool = False
    value: str = ""
    version: Count = 0
    count: Count = 0


class IntercomUpdate(Message, tag="ic_update"):
    """A key of a job's run was put: to every node of the job (waiting gets, subscribers)."""

    TYPE = "ic_update"
    job_id: JobId
    run: Run
    key: KeyText
    value: str
    version: Annotated[int, Meta(ge=1)]


class IntercomFenceDone(Message, tag="ic_fence_done"):
    TYPE = "ic_fence_done"
    job_id: JobId
    run: Run
    epoch: Annotated[int, Meta(ge=1)]


class IntercomDeliver(Message, tag="ic_deliver"):
    """Queue ``command`` for these ranks of a job here; answered with IntercomDelivered (ref = this id)."""

    TYPE = "ic_deliver"
    job_id: JobId
    run: Run
    ranks: NodeRanks
    command: str
    sender: str  # NODE/RANK
    reply: bool = False


INTERCOM_TO_HEAD = (IntercomPut, IntercomGet, IntercomFence, IntercomSend, IntercomDelivered)
INTERCOM_TO_NODE = (IntercomAnswer, IntercomUpdate, IntercomFenceDone, IntercomDeliver)


# --- client -> head: one Message per operation (the commands' socket, the HTTP API) -----------------------


class ClientRequest(Message, forbid_unknown_fields=False):
    """What every client request is. Unknown fields are ignored, as they always were: a request that says
    user=root is still the caller's."""

    @property
    def op(self) -> str:
        """The operation: the request's tag."""
        return self.TYPE


Text = Annotated[str, Meta(max_length=4096, pattern="^[^\x00]*$")]
Name = Annotated[str, Meta(max_length=200, pattern="^[^\x00]*$")]
TimeText = Annotated[str, Meta(max_length=64, description="a Slurm time: MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]")]
UserName = Annotated[str, Meta(min_length=1, max_length=64, pattern="^[^\x00]*$")]
# labels are stored as document keys: no '.' or '$' in a key
LabelKey = Annotated[str, Meta(pattern="^[A-Za-z0-9][A-Za-z0-9_/-]{0,62}$",
                               description="letters, digits, '_', '-' or '/', at most 63")]
Labels = Annotated[dict[LabelKey, Annotated[str, Meta(max_length=256, pattern="^[^\x00]*$")]],
                   Meta(max_length=32, description="e.g. a workflow's name and namespace")]
LabelFilter = Annotated[str, Meta(max_length=320, pattern="^[^=]+=", description="KEY=VALUE")]
IdempotencyKey = Annotated[str, Meta(min_length=1, max_length=200,
                                     description="a repeated key from the same user gets the first job")]
# webhooks (cm.head.notify checks the URLs: http and https only)
NOTIFY_URL_MAX, NOTIFY_URLS_MAX = 2048, 8
NotifyURL = Annotated[str, Meta(min_length=1, max_length=NOTIFY_URL_MAX, description="an http:// or https:// URL")]
NotifyEvent = Literal["begin", "end", "fail"]


class NewJob(Struct, frozen=True, tag_field="kind"):
    """What every job submission may say (``kind`` tells a command from a sync)."""

    nodes: Annotated[int, Meta(ge=1, le=4096, description="nodes to run on (a sync: sender/receiver pairs)")] = 1
    time: TimeText | None = None  # the time limit; None: the cluster's default
    name: Name | None = None
    cwd: Text = "/"
    requeue: bool = False  # requeue on a node failure instead of ending NODE_FAIL (command jobs)
    hold: bool = False  # submit HELD; cmcontrol release lets it run
    priority: Annotated[int, Meta(ge=-1000, le=1000, description="operators only; ignored for others")] | None = None
    labels: Labels = {}
    idempotency_key: IdempotencyKey | None = None
    notify: Annotated[list[NotifyURL], Meta(max_length=NOTIFY_URLS_MAX)] = []  # POST the job's view here when it ends
    notify_on: Annotated[list[NotifyEvent], Meta(max_length=3)] = []  # and on these events (default: end)


class SubmitCommand(NewJob, kw_only=True, tag="command"):
    """Run a command on ``nodes`` nodes, ``procs`` processes on each (cmrun)."""

    argv: Annotated[list[Annotated[str, Meta(max_length=1 << 16)]], Meta(min_length=1)]
    env: list[Annotated[str, Meta(pattern="^[^=]+=", description="NAME=value")]] = []
    procs: Annotated[int, Meta(ge=1, le=4096)] = 1
    cpus: Annotated[int, Meta(ge=1, le=1 << 16, description="CPUs per node; default: procs")] | None = None
    mem_mb: Annotated[int, Meta(ge=0, le=1 << 30)] = 0
    partition: Name | None = None  # None: the first partition
    stdout: Text | None = None  # a pattern with %j %n %t %x %u
    stderr: Text | None = None


class SyncOptions(Struct, frozen=True):
    """How a sync copies (cmsync's options)."""

    delete: bool = False  # delete what the source does not have
    dry_run: bool = False
    checksum: bool = False  # compare contents, not sizes and times
    exclude: list[Annotated[str, Meta(min_length=1, max_length=4096)]] = []
    bwlimit: Annotated[int, Meta(gt=0, description="bytes per second")] | None = None
    transport: Literal["tcp", "rdma"] = "tcp"
    policy: Literal["round-robin", "size-balanced"] = "size-balanced"
    hard_links: bool = True  # keep hard links, xattrs and POSIX ACLs (rsync's -H, -X, -A)
    xattrs: bool = True
    acls: bool = True


class SubmitSync(NewJob, kw_only=True, tag="sync"):
    """Copy ``src`` to ``dst``, each ``PARTITION:/path`` or ``NODE:/path`` (cmsync)."""

    src: Annotated[str, Meta(max_length=4096, description="PARTITION:/path or NODE:/path")]
    dst: Annotated[str, Meta(max_length=4096, description="PARTITION:/path or NODE:/path")]
    options: SyncOptions = SyncOptions()


class Submit(ClientRequest, tag="submit"):
    TYPE = "submit"
    job: Union[SubmitCommand, SubmitSync]


class Cancel(ClientRequest, tag="cancel"):
    TYPE = "cancel"
    job_ids: Annotated[list[JobId], Meta(min_length=1, max_length=100000)]


class Info(ClientRequest, tag="info"):
    TYPE = "info"
    job_id: JobId | None = None  # one job, in detail
    all: bool = False  # finished jobs too, not only recent ones
    nodes_only: bool = False  # only the nodes
    # filters of a listing: any of these states, this user, every one of these labels
    state: Annotated[list[JobState], Meta(max_length=16)] = []
    user: UserName | None = None
    label: Annotated[list[LabelFilter], Meta(max_length=32)] = []


MAX_WAIT = 60.0  # seconds one long poll may last; clients ask again


class Wait(ClientRequest, tag="wait"):
    TYPE = "wait"
    job_id: JobId
    timeout: Annotated[float, Meta(ge=0, le=MAX_WAIT)] = 0.0  # seconds; 0: answer now


class Control(ClientRequest, tag="control"):
    """cmcontrol: hold/release/priority on jobs, drain/resume nodes, block/unblock users."""

    TYPE = "control"

    action: Literal["hold", "release", "priority", "drain", "resume", "block", "unblock"]
    job_id: JobId | None = None
    value: Literal["high", "normal", "low"] | Annotated[int, Meta(ge=-1000, le=1000)] | None = None  # priority
    node: Name = ""
    reason: Text = ""
    user: Name = ""  # "" or ALL: everyone
    token: Text = ""  # the operator token, for those who are not operators


class Delete(ClientRequest, tag="delete"):
    """Remove a final job from the database and from listings (an active one is a CONFLICT)."""

    TYPE = "delete"

    job_id: JobId


class Token(ClientRequest, tag="token"):
    """The caller's HTTP API token; with ``revoke``: that user's token stops working (admins, or oneself)."""

    TYPE = "token"

    revoke: UserName | None = None
    token: Text = ""  # the operator token, for those who are not operators
    lifetime: Annotated[float, Meta(ge=0, le=366 * 86400)] = 0  # seconds the token works; 0: until revoked


class Files(ClientRequest, tag="files"):
    """A page of a sync's per-file report (cminfo JOBID --files, GET /v1/jobs/{id}/files)."""

    TYPE = "files"

    job_id: JobId
    offset: Annotated[int, Meta(ge=0)] = 0  # lines to pass over (the previous page's ``next``)
    limit: Annotated[int, Meta(ge=1, le=10000)] = 1000
    action: Literal["created", "updated", "deleted", "skipped", "failed"] | None = None  # only these lines


class Metrics(ClientRequest, tag="metrics"):
    TYPE = "metrics"


class Ping(ClientRequest, tag="ping"):
    TYPE = "ping"


class Stats(ClientRequest, tag="stats"):
    TYPE = "stats"


REQUESTS = (Submit, Cancel, Info, Wait, Control, Delete, Token, Files, Metrics, Ping, Stats)
Request = Union[Submit, Cancel, Info, Wait, Control, Delete, Token, Files, Metrics, Ping, Stats]


TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (Hello, Heartbeat, JobStarted, JobEnded, Progress, Welcome, RunJob, KillJob, Ack, Error, Reply,
                *REQUESTS, *INTERCOM_TO_HEAD, *INTERCOM_TO_NODE)
}


# --- encoding ---------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Union[tuple(TYPES.values())])  # type: ignore[misc]


class _Envelope(Struct):
    """The fields every protocol version keeps (see OtherVersion)."""

    v: Any = VERSION  # a message without one is of this version (Message.v's default)
    t: Any = None
    node: Any = None
    version: Any = None
    message: Any = None


_envelope = msgspec.msgpack.Decoder(_Envelope)
_AT = re.compile(r" - at `(key` in `)?\$\.?([^`]*)`$")


def named(exc: Exception, what: str = "message") -> str:
    """``field 'job_id': Expected `int`, got `str``` from msgspec's ``... - at `$.job_id``` (``... - at `key`
    in `$.labels```: a key of that map)."""
    text = str(exc)
    m = _AT.search(text)
    if m is None or not m.group(2):
        return f"{what}: {text[:m.start()] if m else text}"
    return f"{what} field {m.group(2)!r}{' (a key)' if m.group(1) else ''}: {text[:m.start()]}"


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Message:
    """Parse and validate one message; raise ProtocolError with the reason."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        msg = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        kind = _check_envelope(data)
        if kind is not None and issubclass(kind, ClientRequest):
            raise Misfit(named(exc, f"{kind.TYPE} arguments")) from None
        raise ProtocolError(named(exc)) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"not msgpack: {exc}") from None
    if msg.v != VERSION:
        _check_envelope(data)  # raises OtherVersion
        raise ProtocolError(f"protocol version {msg.v!r}, expected {VERSION}")
    return msg


def _check_envelope(data: bytes) -> type[Message] | None:
    """The type of a message that does not fit it (None: not even its envelope fits). A message of another
    version is refused as such (OtherVersion), not for the fields that changed; one of an unknown type (a
    client's unknown operation) as that."""
    try:
        envelope = _envelope.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    if envelope.v != VERSION:
        kept = {k: (v[:200] if isinstance(v, str) else v) if isinstance(v, str | int) and not isinstance(v, bool)
                else None for k, v in msgspec.structs.asdict(envelope).items()}  # what the other side said
        raise OtherVersion(_Envelope(**kept))
    if isinstance(envelope.t, str) and envelope.t not in TYPES:
        raise UnknownType(f"unknown operation {envelope.t!r}")
    return TYPES.get(envelope.t) if isinstance(envelope.t, str) else None


# --- framing on stream sockets (the commands' Unix socket: cm.framing) --------


def frame(msg: Message) -> bytes:
    """A message as a frame (cm.framing)."""
    return framing.frame(encode(msg))


def unframe(buffer: bytearray, limit: int = MAX_MESSAGE) -> bytes | None:
    """``cm.framing.unframe``, a frame over ``limit`` a ProtocolError (before any of it is buffered)."""
    try:
        return framing.unframe(buffer, limit)
    except framing.FrameTooBig as exc:
        raise ProtocolError(f"a request of {exc.size} bytes exceeds the limit of {limit}") from None

