"""What the head does for each client request, and who may ask for it.

Each handler gets the typed request (cm.protocol's ``Request``: ``Submit``,
``Cancel``, ``Info``, ``Wait``, ``Control``, ``Delete``, ``Token``, ``Files``, ...,
decoded and validated with the message) and a ``Head``: the narrow part of the server requests may use. It raises
``Refused`` (with an ``ErrorCode``) for what it will not do. The commands'
socket and the HTTP API (cm.api) both come here: the API answers with the
HTTP status of the code.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import time
from typing import Any, Callable, Protocol

import msgspec

from cm.config import Settings
from cm.callers import Caller
from cm.head.notify import NotifyError, job_fields as notify_fields
from cm.head.records import Job
from cm.head.registry import NodeInfo
from cm.head.resources import NodeView as Capacity
from cm.head.scheduler import NeverFits, check_feasible
from cm.head.specs import request_of
from cm.protocol import (
    COUNT_MAX,
    Cancel,
    Control,
    Delete,
    ErrorCode,
    Files,
    Info,
    InfoData,
    JobView,
    NodeView,
    Metrics,
    Ping,
    Reply,
    Request,
    Stats,
    Submit,
    SubmitCommand,
    Token,
    TransferView,
    Wait,
)
from cm.states import JobState
from cm.timefmt import TimeFormatError, parse_time
from cm.transfer.excludes import check_patterns

__all__ = ["Head", "Later", "Refused", "handle", "job_view", "HANDLERS"]


class Head(Protocol):
    """What request handlers may use of the head (HeadState implements it)."""

    settings: Settings
    admin_policy: dict[str, Any]  # blocked_users, block_all

    def nodes(self) -> dict[str, NodeInfo]: ...
    def node_rows(self) -> list[NodeView]:
        """Every node as cminfo shows it."""
    def active(self, job_id: int) -> Job | None:
        """An unfinished job."""
    def find(self, job_id: int) -> Job | None:
        """Any job: unfinished, recently finished, or stored."""
    def listed(self, all_jobs: bool) -> list[Job]:
        """Jobs for cminfo, by id: unfinished and recent ones, or every stored one."""
    def why_waiting(self, job_id: int) -> str | None:
        """Why a PENDING or HELD job waits (squeue's code: None, Held, Blocked, Resources, ...)."""
    def waiting(self, uid: int) -> int:
        """How many of a user's jobs wait (PENDING or HELD)."""
    def submitted_with(self, uid: int, key: str) -> int | None:
        """The job this user submitted with this idempotency key before, if any."""
    def submit(self, fields: dict[str, Any]) -> Job: ...
    def delete(self, job_id: int) -> None:
        """Remove a final job from the database and from listings."""
    def cancel(self, job_id: int) -> str: ...
    def hold(self, job_id: int, held: bool) -> bool: ...
    def set_priority(self, job_id: int, priority: int) -> bool: ...
    def set_drain(self, node: str, drain: bool, reason: str) -> None:
        """KeyError for an unknown node."""
    def set_policy(self, **change: Any) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def metrics(self) -> dict[str, Any]:
        """What /metrics shows: jobs and nodes by state, what syncs moved, the scheduler's pass time."""
    def api_token(self, uid: int, user: str, lifetime: float = 0) -> str:
        """The user's HTTP API token (without a lifetime: the same one until it is revoked)."""
    def revoke_api_token(self, uid: int, user: str) -> None: ...


class Refused(Exception):
    """The request is understood and refused; the message is for the user."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.REFUSED):
        super().__init__(message)
        self.code = code


class Later(Exception):
    """A long poll: answer when job ``job_id`` is final, or at ``deadline`` (monotonic) at the latest."""

    def __init__(self, job_id: int, deadline: float):
        super().__init__(job_id, deadline)
        self.job_id, self.deadline = job_id, deadline


def _time_limit(head: Head, text: str | None) -> float:
    try:
        limit = parse_time(text or head.settings.default_time)
        most = parse_time(head.settings.max_time)
    except TimeFormatError as exc:
        raise Refused(str(exc)) from None
    if limit > most:
        raise Refused(f"time limit {text} exceeds the maximum {head.settings.max_time}")
    return limit


def _location(nodes: "dict[str, NodeInfo]", spec: str, side: str) -> dict:
    """'PARTITION:/path' or 'NODE:/path' -> {partition|node, path}."""
    from cm.transfer.paths import PathEscape, check_lexical

    if ":" not in spec:
        raise Refused(f"{side} must look like PARTITION:/path or NODE:/path, not {spec!r}")
    where, path = spec.split(":", 1)
    try:
        path = check_lexical(path)
    except PathEscape as exc:
        raise Refused(f"{side} {spec!r}: {exc}") from None
    if where in nodes:
        return {"node": where, "path": path}
    if any(n.partition == where for n in nodes.values()):
        return {"partition": where, "path": path}
    raise Refused(f"{side} {spec!r}: no partition or node named {where!r}")


def _check_overlap(nodes: "dict[str, NodeInfo]", src_text: str, src: dict, dst_text: str, dst: dict, delete: bool) -> None:
    """Refuse a destination inside its own source on the same storage (the copy would copy itself,
    without end), the source itself, and --delete into a directory that holds the source."""
    storage = [loc.get("partition") or nodes[loc["node"]].partition for loc in (src, dst)]
    if storage[0] != storage[1]:
        return

    def inside(inner: str, outer: str) -> bool:
        return outer == "" or inner == outer or inner.startswith(outer + "/")

    if src["path"] == dst["path"]:
        raise Refused(f"DST {dst_text!r} is the same directory as SRC {src_text!r} (same storage)")
    if inside(dst["path"], src["path"]):
        raise Refused(f"DST {dst_text!r} is inside SRC {src_text!r} on the same storage: the copy would copy "
                      "itself; choose a destination outside the source")
    if delete and inside(src["path"], dst["path"]):
        raise Refused(f"--delete with SRC {src_text!r} inside DST {dst_text!r} would delete the source")


def _default_partition(nodes: "dict[str, NodeInfo]") -> str:
    partitions = sorted({n.partition for n in nodes.values()})
    if not partitions:
        raise Refused("the cluster has no compute nodes yet")
    return partitions[0]


def submit(head: Head, caller: Caller, request: Submit) -> dict:
    args = request.job
    if args.idempotency_key is not None:
        first = head.submitted_with(caller.uid, args.idempotency_key)
        if first is not None:
            return {"job_id": first, "repeated": True}
    policy = head.admin_policy
    if not caller.operator and (policy.get("block_all") or caller.user in policy.get("blocked_users", [])):
        raise Refused(f"submissions from {caller.user} are blocked by an administrator", ErrorCode.FORBIDDEN)
    limit = head.settings.max_pending_per_user
    if not caller.operator and head.waiting(caller.uid) >= limit:
        raise Refused(f"{caller.user} already has {limit} jobs waiting (CM_MAX_PENDING_PER_USER); "
                      "submit more when some have started")
    nodes = head.nodes()
    fields: dict[str, Any] = {
        "user": caller.user, "uid": caller.uid, "gid": caller.gid, "nodes": args.nodes,
        "time_limit": _time_limit(head, args.time), "requeue": args.requeue, "submitted": time.time(),
        "state": JobState.HELD.value if args.hold else JobState.PENDING.value,
    }
    if isinstance(args, SubmitCommand):
        # the operator token never reaches a job (its processes' environment is readable in /proc)
        secret = head.settings.operator_token
        env = [e for e in args.env if not e.startswith("CM_OPERATOR_TOKEN=") and not (secret and secret in e)]
        if not os.path.isabs(args.cwd):
            raise Refused(f"working directory {args.cwd!r} must be absolute")
        fields.update(
            kind="command", name=args.name or os.path.basename(args.argv[0]) or "job", argv=args.argv, env=env,
            cwd=args.cwd, procs=args.procs, cpus=args.cpus or args.procs, mem_mb=args.mem_mb,
            partition=args.partition or _default_partition(nodes), stdout=args.stdout or "",
            stderr=args.stderr or "",
        )
    else:
        options = args.options
        if options.transport == "rdma":
            from cm.transfer.rdma import missing

            reason = missing()
            if reason:
                raise Refused(f"--transport rdma is not available: {reason}")
        try:
            check_patterns(options.exclude)  # matched in linear time, but their number and length are bounded
        except ValueError as exc:
            raise Refused(str(exc)) from None
        src, dst = _location(nodes, args.src, "SRC"), _location(nodes, args.dst, "DST")
        _check_overlap(nodes, args.src, src, args.dst, dst, options.delete)
        opts = {
            "delete": options.delete, "dry_run": options.dry_run, "checksum": options.checksum,
            "exclude": options.exclude, "bwlimit": options.bwlimit, "policy": options.policy,
            "hard_links": options.hard_links, "xattrs": options.xattrs, "acls": options.acls,
            "streams": head.settings.streams, "chunk_size": head.settings.chunk_mb << 20,
            # root's and operators' syncs keep owners and groups, like `rsync -a` as root
            "owners": caller.operator,
        }
        fields.update(
            kind="sync", name=args.name or "sync", argv=[], env=[], cwd=args.cwd,
            partition=src.get("partition") or nodes[src["node"]].partition,
            sync={"src": src, "dst": dst, "options": opts, "nonce": secrets.token_hex(16),
                  "transport": options.transport},
        )
        if src.get("node") or dst.get("node"):
            fields["nodes"] = 1
    if caller.operator and args.priority is not None:
        fields["priority"] = args.priority
    if args.labels:
        fields["labels"] = args.labels
    if args.idempotency_key is not None:
        fields["idempotency_key"] = args.idempotency_key
    try:  # webhooks (cm.head.notify)
        fields.update(notify_fields(list(args.notify), list(args.notify_on)))
    except NotifyError as exc:
        raise Refused(str(exc)) from None
    probe = request_of({**fields, "_id": 0})  # type: ignore[typeddict-item]
    try:
        check_feasible(probe, (Capacity(n.name, n.partition, n.cpus, n.mem_mb) for n in nodes.values()))
    except NeverFits as exc:
        raise Refused(f"job can never run: {exc}") from None
    return {"job_id": head.submit(fields)["_id"]}


def _own(head: Head, caller: Caller, job_id: int | None, admin: bool) -> Job:
    if job_id is None:
        raise Refused("give a job id", ErrorCode.BAD_MESSAGE)
    job = head.active(job_id)
    known = job or head.find(job_id)
    if known is None:
        raise Refused(f"job {job_id} does not exist", ErrorCode.NOT_FOUND)
    # whose it is comes first: what state someone else's job is in is none of the caller's business
    if not (admin or caller.operator or known["uid"] == caller.uid):
        raise Refused(f"job {job_id} belongs to {known['user']}; you may only act on your own jobs",
                      ErrorCode.FORBIDDEN)
    if job is None:
        raise Refused(f"job {job_id} has already finished ({known['state']})", ErrorCode.CONFLICT)
    return job


def delete(head: Head, caller: Caller, args: Delete) -> dict:
    """Remove a final job from the database and from what cminfo shows; an active job is refused."""
    job = head.find(args.job_id)
    if job is None:
        raise Refused(f"job {args.job_id} does not exist", ErrorCode.NOT_FOUND)
    if not (caller.operator or job["uid"] == caller.uid):
        raise Refused(f"job {args.job_id} belongs to {job['user']}; you may only delete your own jobs",
                      ErrorCode.FORBIDDEN)
    if head.active(args.job_id) is not None:
        raise Refused(f"job {args.job_id} is {job['state']}; cancel it and delete it once it has ended",
                      ErrorCode.CONFLICT)
    head.delete(args.job_id)
    return {"job_id": args.job_id, "deleted": True}


def token(head: Head, caller: Caller, args: Token) -> dict:
    """The caller's HTTP API token; with ``revoke``: USER's token stops working (admins, or oneself)."""
    if args.revoke is None:
        return {"user": caller.user, "token": head.api_token(caller.uid, caller.user, args.lifetime)}
    if args.revoke != caller.user:
        _admin(head, caller, args.token)
    try:
        uid = pwd.getpwnam(args.revoke).pw_uid
    except KeyError:
        raise Refused(f"no user named {args.revoke!r}", ErrorCode.NOT_FOUND) from None
    head.revoke_api_token(uid, args.revoke)
    return {"user": args.revoke, "revoked": True}


def cancel(head: Head, caller: Caller, args: Cancel) -> dict:
    results = {}
    for job_id in args.job_ids:
        try:
            _own(head, caller, job_id, admin=False)
            results[str(job_id)] = {"ok": True, "state": head.cancel(job_id)}
        except Refused as exc:
            results[str(job_id)] = {"ok": False, "error": str(exc), "code": exc.code.value}
    return results


def info(head: Head, caller: Caller, args: Info) -> InfoData:
    """Nodes and jobs for cminfo: unfinished ones from memory, finished ones from the database."""
    nodes = head.node_rows()
    if args.nodes_only:
        return InfoData(nodes=nodes)
    if args.job_id is not None:
        job = head.find(args.job_id)
        if job is None:
            raise Refused(f"job {args.job_id} does not exist", ErrorCode.NOT_FOUND)
        if job["kind"] == "sync":
            sync = job.get("sync") or {}
            command = " ".join(f"{s.get('node') or s.get('partition')}:{s.get('path')}"
                               for s in (sync.get("src", {}), sync.get("dst", {})))
        else:
            command = " ".join(job.get("argv") or [])
        # like Slurm's PrivateData: a job's environment is its owner's (and the admins') business
        env = list(job.get("env") or []) if caller.operator or job["uid"] == caller.uid else None
        view = msgspec.structs.replace(job_view(job, head.why_waiting(job["_id"])), command=command,
                                       workdir=job.get("cwd"), env=env)
        return InfoData(nodes=nodes, jobs=[view])
    return InfoData(nodes=nodes, jobs=[job_view(j, head.why_waiting(j["_id"])) for j in head.listed(args.all)
                                       if _matches(j, args)])


def _matches(job: Job, args: Info) -> bool:
    """A listing's filters: any of the states, the user, every label (KEY=VALUE)."""
    if args.state and job["state"] not in args.state:
        return False
    if args.user and job["user"] != args.user:
        return False
    labels = job.get("labels") or {}
    for label in args.label:
        key, _, value = label.partition("=")
        if labels.get(key) != value:
            return False
    return True


def files(head: Head, caller: Caller, args: Files) -> dict:
    """A page of a sync's per-file report, read as the job's user from its cmlogs/ (``cm.transfer.report``)."""
    from pathlib import Path

    from cm.creds import CredentialsError, Identity, acting_as, groups_of
    from cm.transfer import report

    job = head.active(args.job_id) or head.find(args.job_id)
    if job is None:
        raise Refused(f"job {args.job_id} does not exist", ErrorCode.NOT_FOUND)
    if not (caller.operator or job["uid"] == caller.uid):
        raise Refused(f"job {args.job_id} belongs to {job['user']}", ErrorCode.FORBIDDEN)
    if job["kind"] != "sync":
        raise Refused(f"job {args.job_id} is not a sync: only syncs write a per-file report")
    directory = Path(job["cwd"] or "/") / "cmlogs" / str(job["_id"])
    who = Identity(job["uid"], job["gid"], tuple(groups_of(job["uid"], job["gid"])))
    try:
        with acting_as(who) if os.geteuid() == 0 else contextlib.nullcontext():  # read as the job's user
            lines, after = report.read(directory, job["nodes"], args.offset, args.limit, args.action)
    except FileNotFoundError:
        raise Refused(f"job {args.job_id} has no report in {directory} (yet)", ErrorCode.NOT_FOUND) from None
    except (OSError, CredentialsError) as exc:
        raise Refused(f"the report of job {args.job_id} cannot be read: {exc}") from None
    return {"job_id": job["_id"], "files": lines, "next": after}


def wait(head: Head, caller: Caller, args: Wait) -> InfoData:
    """``info`` of one job, answered once the job is final or after ``timeout`` seconds (a long poll)."""
    if args.timeout > 0 and head.active(args.job_id) is not None:  # active: the head answers when it ends
        raise Later(args.job_id, time.monotonic() + args.timeout)
    return info(head, caller, Info(job_id=args.job_id))


def _iso(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts)) if ts else None


def waiting_reason(job: Job, why: str | None) -> str:
    """For a waiting job, why (squeue's code, then what happened to it before, if anything); else the
    stored reason (why it ended, or was requeued)."""
    before = job.get("reason", "")
    if why and job["state"] in (JobState.PENDING.value, JobState.HELD.value):
        return f"{why}; {before}" if before else why
    return before


def job_view(job: Job, why: str | None = None) -> JobView:
    """A job as cminfo shows it; ``why``: why it waits, if it does (memory only)."""
    state = job["state"]
    progress = None
    if job["kind"] == "sync":
        p = job.get("progress") or {}
        if state == JobState.COMPLETED.value:
            progress = 100.0
        elif p.get("bytes_total"):
            progress = round(100.0 * p.get("bytes_done", 0) / p["bytes_total"], 1)
        elif p.get("files_total"):
            progress = round(100.0 * p.get("files_done", 0) / p["files_total"], 1)
        elif state in (JobState.RUNNING.value,):
            progress = 0.0
    started, ended = job.get("started"), job.get("ended")
    slots = job.get("slots", [])
    return JobView(
        id=job["_id"], name=job["name"], user=job["user"], type=job["kind"], state=state,
        nodes=[s["node"] for s in slots if s.get("role") != "dst"] + [s["node"] for s in slots if s.get("role") == "dst"],
        exit_code=job.get("exit_code"), progress=progress,
        submitted=_iso(job.get("submitted")), started=_iso(started), ended=_iso(ended),
        elapsed=((ended or time.time()) - started) if started else None,
        partition=job.get("partition"), reason=waiting_reason(job, why), time_limit=job.get("time_limit"),
        priority=job.get("priority", 0), transfer=transfer_view(job) if job["kind"] == "sync" else None,
        labels=job.get("labels") or {}, num_nodes=job.get("nodes"),
        times={"submitted": job.get("submitted"), "started": started, "ended": ended},  # epoch seconds
        dst=_where((job.get("sync") or {}).get("dst")) if job["kind"] == "sync" else None,
        notify=job.get("notify_error") or None,
    )


def _where(location: dict | None) -> str | None:
    """A sync's side as {partition|node, path} -> the partition or node it names."""
    return (location.get("node") or location.get("partition")) if location else None


def transfer_view(job: Job) -> TransferView:
    """A sync job's counters as a program needs them (the progress the nodes report, summed), keeping the
    keys cmsync's progress bar reads; ``rate`` is the effective one (bytes over elapsed) once final."""
    p = job.get("progress") or {}
    stats = p.get("stats") or {}
    started, ended = job.get("started"), job.get("ended")
    rate = p.get("rate", 0)
    if ended and started and ended > started:
        rate = p.get("bytes_done", 0) / (ended - started)
    return TransferView(
        bytes_done=p.get("bytes_done", 0), bytes_total=p.get("bytes_total", 0),
        files_done=p.get("files_done", 0), files_total=p.get("files_total", 0),
        files_skipped=stats.get("files_skipped", 0), files_deleted=stats.get("files_deleted", 0),
        retries=min(COUNT_MAX, job.get("restarts", 0) + stats.get("chunks_resent", 0)), errors=stats.get("errors", 0),
        skipped=stats.get("skipped", 0),
        rate=rate, message=job.get("reason") or "", started=started, ended=ended, stats=dict(stats),
    )


def _admin(head: Head, caller: Caller, given: str) -> bool:
    """Whether the caller may act as an administrator (``given``: the operator token they sent, if any)."""
    token = head.settings.operator_token
    if caller.operator or (token and secrets.compare_digest(given, token)):
        return True
    raise Refused("this needs an administrator: root, the operator group, or the operator token", ErrorCode.FORBIDDEN)


PRIORITY_LEVELS = {"high": 100, "normal": 0, "low": -100}


def control(head: Head, caller: Caller, args: Control) -> dict:
    """Admin operations: hold/release/priority on jobs, drain/resume nodes, block/unblock users."""
    action = args.action
    if action in ("hold", "release"):
        # owners may hold and release their own pending jobs, like scontrol
        job = _own(head, caller, args.job_id, admin=False)
        if action == "hold" and job["state"] != JobState.PENDING.value:
            raise Refused(f"job {job['_id']} is {job['state']}; only a PENDING job can be held")
        if action == "release" and job["state"] != JobState.HELD.value:
            raise Refused(f"job {job['_id']} is {job['state']}; only a HELD job can be released")
        if not head.hold(job["_id"], action == "hold"):
            raise Refused(f"job {job['_id']} changed meanwhile; look again")
        return {"job_id": job["_id"], "state": job["state"]}
    _admin(head, caller, args.token)
    if action == "priority":
        job = _own(head, caller, args.job_id, admin=True)
        value = args.value
        priority = PRIORITY_LEVELS[value] if isinstance(value, str) else value
        if priority is None:
            raise Refused("priority must be high, normal, low or an integer")
        if not head.set_priority(job["_id"], priority):
            raise Refused(f"job {job['_id']} changed meanwhile; look again")
        return {"job_id": job["_id"], "priority": priority}
    if action in ("drain", "resume"):
        try:
            head.set_drain(args.node, action == "drain", args.reason)
        except KeyError:
            raise Refused(f"node {args.node!r} does not exist", ErrorCode.NOT_FOUND) from None
        return {"node": args.node, "drain": action == "drain"}
    user = args.user  # block, unblock
    blocked = set(head.admin_policy.get("blocked_users", []))
    if user in ("", "ALL"):
        change: dict[str, Any] = {"block_all": action == "block"}
    else:
        (blocked.add if action == "block" else blocked.discard)(user)
        change = {"blocked_users": sorted(blocked)}
    head.set_policy(**change)
    return {"user": user or "ALL", "blocked": action == "block"}


HANDLERS: dict[type, Callable[[Head, Caller, Any], Any]] = {
    Submit: submit,
    Cancel: cancel,
    Info: info,
    Wait: wait,
    Files: files,
    Control: control,
    Delete: delete,
    Token: token,
    Metrics: lambda head, caller, request: head.metrics(),
    Ping: lambda head, caller, request: {"pong": True, "user": caller.user},
    Stats: lambda head, caller, request: head.stats(),
}


def handle(head: Head, caller: Caller, request: Request) -> Reply:
    """Run the request's handler (its fields were checked against its type as it was decoded); Later for a
    long poll. Database errors are the caller's (the server's) to handle."""
    try:
        return Reply(ok=True, data=HANDLERS[type(request)](head, caller, request))
    except Refused as exc:
        return Reply(ok=False, error=str(exc), code=exc.code)
