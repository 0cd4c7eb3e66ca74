"""What the head does for each client request, and who may ask for it."""

from __future__ import annotations

import os
import pwd
import re
import secrets
import time
from typing import TYPE_CHECKING, Any, Callable

from cm import store
from cm.head.clients import Caller
from cm.head.jobs import Outcome, request_of
from cm.head.resources import NodeView
from cm.head.scheduler import NeverFits, check_feasible
from cm.protocol import Reply, Request
from cm.states import JobState
from cm.timefmt import TimeFormatError, parse_time

if TYPE_CHECKING:
    from cm.head.server import HeadServer


class Refused(Exception):
    """The request is understood and refused; the message is for the user. ``status`` is the HTTP
    status the API answers with (400 bad input, 403 not allowed, 404 no such thing, 409 wrong state)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Later(Exception):
    """A long poll: answer when job ``job_id`` is final, or at ``deadline`` (monotonic) at the latest."""

    def __init__(self, job_id: int, deadline: float):
        super().__init__(job_id, deadline)
        self.job_id, self.deadline = job_id, deadline


MAX_WAIT = 60.0  # seconds one long poll may last; clients ask again


def _int(args: dict, key: str, default: int, low: int = 0, high: int = 1 << 31) -> int:
    value = args.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise Refused(f"{key} must be an integer from {low} to {high}")
    return value


def _str(args: dict, key: str, default: str = "", limit: int = 4096) -> str:
    value = args.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, str) or len(value) > limit or "\x00" in value:
        raise Refused(f"{key} must be a string of at most {limit} characters")
    return value


def _time_limit(head: "HeadServer", args: dict) -> float:
    try:
        limit = parse_time(_str(args, "time") or head.settings.default_time)
        most = parse_time(head.settings.max_time)
    except TimeFormatError as exc:
        raise Refused(str(exc)) from None
    if limit > most:
        raise Refused(f"time limit {args.get('time')} exceeds the maximum {head.settings.max_time}")
    return limit


def _location(head: "HeadServer", spec: Any, side: str) -> dict:
    """'PARTITION:/path' or 'NODE:/path' -> {partition|node, path}."""
    from cm.transfer.paths import PathEscape, check_lexical

    if not isinstance(spec, str) or ":" not in spec:
        raise Refused(f"{side} must look like PARTITION:/path or NODE:/path, not {spec!r}")
    where, path = spec.split(":", 1)
    try:
        path = check_lexical(path)
    except PathEscape as exc:
        raise Refused(f"{side} {spec!r}: {exc}") from None
    if where in head.registry.nodes:
        return {"node": where, "path": path}
    if any(n.partition == where for n in head.registry.nodes.values()):
        return {"partition": where, "path": path}
    raise Refused(f"{side} {spec!r}: no partition or node named {where!r}")


def _check_overlap(head: "HeadServer", src_text: str, src: dict, dst_text: str, dst: dict, delete: bool) -> None:
    """Refuse a destination inside its own source on the same storage (the copy would copy itself,
    without end), the source itself, and --delete into a directory that holds the source."""
    nodes = head.registry.nodes
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


def _default_partition(head: "HeadServer") -> str:
    partitions = sorted({n.partition for n in head.registry.nodes.values()})
    if not partitions:
        raise Refused("the cluster has no compute nodes yet")
    return partitions[0]


_WAITING = (JobState.PENDING.value, JobState.HELD.value)


def _waiting(head: "HeadServer", uid: int) -> int:
    return sum(1 for j in head.jobs.jobs.values() if j["uid"] == uid and j["state"] in _WAITING)


def submit(head: "HeadServer", caller: Caller, args: dict) -> dict:
    key = args.get("idempotency_key")
    if key is not None:
        key = _str(args, "idempotency_key", "", 200)
        first = _submitted_with(head, caller, key)
        if first is not None:
            return {"job_id": first, "repeated": True}
    labels = _labels(args.get("labels"))
    policy = head.admin_policy
    if not caller.operator and (policy.get("block_all") or caller.user in policy.get("blocked_users", [])):
        raise Refused(f"submissions from {caller.user} are blocked by an administrator", 403)
    limit = head.settings.max_pending_per_user
    if not caller.operator and _waiting(head, caller.uid) >= limit:
        raise Refused(f"{caller.user} already has {limit} jobs waiting (CM_MAX_PENDING_PER_USER); "
                      "submit more when some have started")
    kind = _str(args, "kind", "command")
    fields: dict[str, Any] = {
        "user": caller.user, "uid": caller.uid, "gid": caller.gid, "kind": kind,
        "nodes": _int(args, "nodes", 1, 1, 4096), "time_limit": _time_limit(head, args),
        "requeue": bool(args.get("requeue", False)), "submitted": time.time(),
        "state": JobState.HELD.value if args.get("hold") else JobState.PENDING.value,
    }
    if kind == "command":
        argv = args.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise Refused("a command job needs a command to run")
        env = args.get("env", [])
        if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e[1:] for e in env):
            raise Refused("env must be a list of NAME=value strings")
        # the operator token never reaches a job (its processes' environment is readable in /proc)
        secret = head.settings.operator_token
        env = [e for e in env if not e.startswith("CM_OPERATOR_TOKEN=") and not (secret and secret in e)]
        cwd = _str(args, "cwd", "/")
        if not os.path.isabs(cwd):
            raise Refused(f"working directory {cwd!r} must be absolute")
        procs = _int(args, "procs", 1, 1, 4096)
        fields.update(
            name=_str(args, "name", "", 200) or os.path.basename(argv[0]) or "job", argv=argv, env=env, cwd=cwd,
            procs=procs, cpus=_int(args, "cpus", procs, 1, 1 << 16), mem_mb=_int(args, "mem_mb", 0, 0, 1 << 30),
            partition=_str(args, "partition", "", 200) or _default_partition(head),
            stdout=_str(args, "stdout"), stderr=_str(args, "stderr"),
        )
    elif kind == "sync":
        options = args.get("options", {})
        if not isinstance(options, dict):
            raise Refused("options must be a map")
        if options.get("transport", "tcp") == "rdma":
            from cm.transfer.rdma import missing

            reason = missing()
            if reason:
                raise Refused(f"--transport rdma is not available: {reason}")
        elif options.get("transport", "tcp") != "tcp":
            raise Refused(f"unknown transport {options.get('transport')!r}: use tcp or rdma")
        src, dst = _location(head, args.get("src"), "SRC"), _location(head, args.get("dst"), "DST")
        _check_overlap(head, args.get("src"), src, args.get("dst"), dst, bool(options.get("delete")))
        exclude = options.get("exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
            raise Refused("exclude must be a list of patterns")
        bwlimit = options.get("bwlimit")
        if bwlimit is not None and (not isinstance(bwlimit, int) or bwlimit <= 0):
            raise Refused("bwlimit must be a positive number of bytes per second")
        policy_name = _str(options, "policy", "size-balanced")
        if policy_name not in ("round-robin", "size-balanced"):
            raise Refused(f"unknown sync policy {policy_name!r}: use round-robin or size-balanced")
        opts = {
            "delete": bool(options.get("delete")), "dry_run": bool(options.get("dry_run")),
            "checksum": bool(options.get("checksum")), "exclude": exclude, "bwlimit": bwlimit,
            "policy": policy_name, "streams": head.settings.streams, "chunk_size": head.settings.chunk_mb << 20,
            # root's and operators' syncs keep owners and groups, like `rsync -a` as root
            "owners": caller.operator,
        }
        fields.update(
            name=_str(args, "name", "", 200) or "sync", argv=[], env=[], cwd=_str(args, "cwd", "/"),
            partition=src.get("partition") or head.registry.nodes[src["node"]].partition,
            sync={"src": src, "dst": dst, "options": opts, "token": secrets.token_hex(16),
                  "transport": options.get("transport", "tcp")},
        )
        if src.get("node") or dst.get("node"):
            fields["nodes"] = 1
    else:
        raise Refused(f"unknown job type {kind!r}")
    if caller.operator and "priority" in args:
        fields["priority"] = _int(args, "priority", 0, -1000, 1000)
    probe = request_of({**fields, "_id": 0})
    try:
        check_feasible(probe, (NodeView(n.name, n.partition, n.cpus, n.mem_mb) for n in head.registry.nodes.values()))
    except NeverFits as exc:
        raise Refused(f"job can never run: {exc}") from None
    if labels:
        fields["labels"] = labels
    if key:
        fields["idempotency_key"] = key
    fields["id"] = head.jobs.next_id()
    doc = store.insert_job(fields)
    head.jobs.add(doc)
    head.dirty = True
    return {"job_id": doc["_id"]}


LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_/-]{0,62}")
MAX_LABELS = 32


def _labels(labels: Any) -> dict[str, str]:
    """Check a job's labels: at most MAX_LABELS, keys like LABEL_KEY (no '.' or '$': they are stored as
    document keys), values strings of at most 256 characters."""
    if labels is None:
        return {}
    if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
        raise Refused(f"labels must be a map of at most {MAX_LABELS} KEY: VALUE strings")
    for k, v in labels.items():
        if not isinstance(k, str) or not LABEL_KEY.fullmatch(k):
            raise Refused(f"label key {k!r} must be letters, digits, '_', '-' or '/' (at most 63)")
        if not isinstance(v, str) or len(v) > 256 or "\x00" in v:
            raise Refused(f"label {k}'s value must be a string of at most 256 characters")
    return dict(labels)


def _submitted_with(head: "HeadServer", caller: Caller, key: str) -> int | None:
    """The job this user submitted with this Idempotency-Key before, if any."""
    for job in (*head.jobs.jobs.values(), *head.jobs.recent.values()):
        if job.get("idempotency_key") == key and job["uid"] == caller.uid:
            return job["_id"]
    stored = store.job_by_key(caller.uid, key)
    return None if stored is None else stored["_id"]


def _job_id(job_id: Any) -> int:
    if not isinstance(job_id, int) or isinstance(job_id, bool):
        raise Refused(f"invalid job id {job_id!r}")
    return job_id


def _own(head: "HeadServer", caller: Caller, job_id: Any, admin: bool) -> dict:
    job = head.jobs.jobs.get(_job_id(job_id))
    if job is None:
        stored = store.get_job(job_id)
        if stored is None:
            raise Refused(f"job {job_id} does not exist", 404)
        raise Refused(f"job {job_id} has already finished ({stored['state']})", 409)
    if not (admin or caller.operator or job["uid"] == caller.uid):
        raise Refused(f"job {job_id} belongs to {job['user']}; you may only act on your own jobs", 403)
    return job


def delete(head: "HeadServer", caller: Caller, args: dict) -> dict:
    """Remove a final job from the database and from what cminfo shows; an active job is refused."""
    job_id = _job_id(args.get("job_id"))
    job = head.jobs.jobs.get(job_id)
    if job is None:
        job = head.jobs.recent.get(job_id) or store.get_job(job_id)
        if job is None:
            raise Refused(f"job {job_id} does not exist", 404)
    if not (caller.operator or job["uid"] == caller.uid):
        raise Refused(f"job {job_id} belongs to {job['user']}; you may only delete your own jobs", 403)
    if job_id in head.jobs.jobs:
        raise Refused(f"job {job_id} is {job['state']}; cancel it and delete it once it has ended", 409)
    store.delete_job(job_id)
    head.jobs.recent.pop(job_id, None)
    return {"job_id": job_id, "deleted": True}


def token(head: "HeadServer", caller: Caller, args: dict) -> dict:
    """The caller's HTTP API token; with ``revoke``: USER's token stops working (admins, or oneself)."""
    from cm.api import tokens

    target = args.get("revoke")
    if target is None:
        return {"user": caller.user, "token": tokens.issue(head.settings.run_dir, caller.uid, caller.user)}
    target = _str(args, "revoke", "", 64)
    if target != caller.user:
        _admin(head, caller, args)
    try:
        uid = pwd.getpwnam(target).pw_uid
    except KeyError:
        raise Refused(f"no user named {target!r}", 404) from None
    tokens.revoke(uid, target)
    if head.on_token_revoked is not None:
        head.on_token_revoked()
    return {"user": target, "revoked": True}


def _matches(job: dict, args: dict) -> bool:
    """Filters of a job listing: state (one or a list), user, label ("KEY=VALUE", one or a list)."""
    states, user, labels = args.get("state"), args.get("user"), args.get("label")
    if states and job["state"] not in ([states] if isinstance(states, str) else states):
        return False
    if user and job["user"] != user:
        return False
    for label in ([labels] if isinstance(labels, str) else labels or ()):
        k, _, v = label.partition("=")
        if (job.get("labels") or {}).get(k) != v:
            return False
    return True


def _check_filters(args: dict) -> None:
    for key in ("state", "label"):
        value = args.get(key)
        if value is not None and not (isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise Refused(f"{key} must be a string or a list of strings")
    for label in ([args["label"]] if isinstance(args.get("label"), str) else args.get("label") or ()):
        if "=" not in label:
            raise Refused(f"label filter {label!r} must look like KEY=VALUE")
    _str(args, "user", "", 64)


def cancel(head: "HeadServer", caller: Caller, args: dict, admin: bool) -> dict:
    ids = args.get("job_ids")
    if not isinstance(ids, list) or not ids:
        raise Refused("give at least one job id")
    results = {}
    for job_id in ids:
        try:
            _own(head, caller, job_id, admin)
            out = Outcome()
            results[str(job_id)] = {"ok": True, "state": head.jobs.cancel(job_id, out)}
            head.apply(out)
        except Refused as exc:
            results[str(job_id)] = {"ok": False, "error": str(exc), "status": exc.status}
    return results


def info(head: "HeadServer", caller: Caller, args: dict) -> dict:
    """Nodes and jobs for cminfo: unfinished ones from memory, finished ones from the database."""
    used = head.jobs.usage()
    nodes = []
    for n in sorted(head.registry.nodes.values(), key=lambda n: head.sort_key(n.name)):
        c, m = used.get(n.name, (0, 0))
        nodes.append({"name": n.name, "partition": n.partition, "state": head.registry.state_of(n, c).value,
                      "cpus": n.cpus, "cpus_free": n.cpus - c, "mem_mb": n.mem_mb, "mem_free_mb": n.mem_mb - m,
                      "reason": n.reason})
    if args.get("nodes_only"):
        return {"nodes": nodes}
    job_id = args.get("job_id")
    if job_id is not None:
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            raise Refused(f"invalid job id {job_id!r}")
        job = head.jobs.jobs.get(job_id) or head.jobs.recent.get(job_id) or store.get_job(job_id)
        if job is None:
            raise Refused(f"job {job_id} does not exist", 404)
        view = job_view(job)
        if job["kind"] == "sync":
            sync = job.get("sync") or {}
            view["command"] = " ".join(f"{s.get('node') or s.get('partition')}:{s.get('path')}"
                                       for s in (sync.get("src", {}), sync.get("dst", {})))
        else:
            view["command"] = " ".join(job.get("argv") or [])
        view["workdir"] = job.get("cwd")
        # like Slurm's PrivateData: a job's environment is its owner's (and the admins') business
        view["env"] = list(job.get("env") or []) if caller.operator or job["uid"] == caller.uid else None
        return {"nodes": nodes, "jobs": [view]}
    _check_filters(args)
    if args.get("all"):
        known = {j["_id"]: j for j in store.recent_jobs(None)}
        known.update(head.jobs.jobs)  # memory is newer for unfinished jobs (progress)
        shown = [j for _, j in sorted(known.items())]
    else:
        shown = sorted(head.jobs.shown(), key=lambda j: j["_id"])
    return {"nodes": nodes, "jobs": [job_view(j) for j in shown if _matches(j, args)]}


def wait(head: "HeadServer", caller: Caller, args: dict) -> dict:
    """``info`` of one job, answered once the job is final or after ``timeout`` seconds (a long poll)."""
    job_id, timeout = args.get("job_id"), args.get("timeout", 0)
    if not isinstance(job_id, int) or isinstance(job_id, bool):
        raise Refused(f"invalid job id {job_id!r}")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 <= timeout <= MAX_WAIT:
        raise Refused(f"timeout must be a number of seconds from 0 to {MAX_WAIT:g}")
    if timeout > 0 and job_id in head.jobs.jobs:  # active: the head answers when it ends
        raise Later(job_id, time.monotonic() + timeout)
    return info(head, caller, {"job_id": job_id})


def _iso(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts)) if ts else None


def waiting_reason(job: dict) -> str:
    """For a waiting job, why (squeue's code, then what happened to it before, if anything); else the
    stored reason (why it ended, or was requeued)."""
    why, before = job.get("pending_reason"), job.get("reason", "")
    if why and job["state"] in (JobState.PENDING.value, JobState.HELD.value):
        return f"{why}; {before}" if before else why
    return before


def job_view(job: dict) -> dict:
    state = job["state"]
    progress = None
    if job["kind"] == "sync":
        p = job.get("progress") or {}
        if state == JobState.COMPLETED.value:
            progress = 100.0
        elif p.get("bytes_total"):
            progress = round(100.0 * p["bytes_done"] / p["bytes_total"], 1)
        elif p.get("files_total"):
            progress = round(100.0 * p["files_done"] / p["files_total"], 1)
        elif state in (JobState.RUNNING.value,):
            progress = 0.0
    started, ended = job.get("started"), job.get("ended")
    return {
        "id": job["_id"], "name": job["name"], "user": job["user"], "type": job["kind"], "state": state,
        "nodes": [s["node"] for s in job.get("slots", []) if s.get("role") != "dst"]
        + [s["node"] for s in job.get("slots", []) if s.get("role") == "dst"],
        "exit_code": job.get("exit_code"), "progress": progress,
        "submitted": _iso(job.get("submitted")), "started": _iso(started), "ended": _iso(ended),
        "elapsed": ((ended or time.time()) - started) if started else None,
        "partition": job.get("partition"), "reason": waiting_reason(job), "time_limit": job.get("time_limit"),
        "priority": job.get("priority", 0), "transfer": transfer_view(job) if job["kind"] == "sync" else None,
        "labels": job.get("labels") or {},
        "num_nodes": job.get("nodes"),
        "times": {"submitted": job.get("submitted"), "started": started, "ended": ended},  # epoch seconds
    }


def transfer_view(job: dict) -> dict:
    """A sync job's counters as a program needs them (the progress the nodes report, summed), keeping the
    keys cmsync's progress bar reads; ``rate`` is the effective one (bytes over elapsed) once final."""
    p = job.get("progress") or {}
    stats = p.get("stats") or {}
    started, ended = job.get("started"), job.get("ended")
    rate = p.get("rate", 0)
    if ended and started and ended > started:
        rate = p.get("bytes_done", 0) / (ended - started)
    return {
        "bytes_done": p.get("bytes_done", 0), "bytes_total": p.get("bytes_total", 0),
        "files_done": p.get("files_done", 0), "files_total": p.get("files_total", 0),
        "files_skipped": stats.get("files_skipped", 0), "files_deleted": stats.get("files_deleted", 0),
        "retries": job.get("restarts", 0) + stats.get("chunks_resent", 0), "errors": stats.get("errors", 0),
        "rate": rate, "message": job.get("reason") or "", "started": started, "ended": ended, "stats": stats,
    }


def _admin(head: "HeadServer", caller: Caller, args: dict) -> bool:
    token = head.settings.operator_token
    if caller.operator or (token and secrets.compare_digest(str(args.get("token", "")), token)):
        return True
    raise Refused("this needs an administrator: root, the operator group, or the operator token", 403)


def control(head: "HeadServer", caller: Caller, args: dict) -> dict:
    """Admin operations: hold/release/priority on jobs, drain/resume nodes, block/unblock users."""
    action = _str(args, "action")
    if action in ("hold", "release"):
        # owners may hold and release their own pending jobs, like scontrol
        job = _own(head, caller, args.get("job_id"), admin=False)
        if action == "hold" and job["state"] != JobState.PENDING.value:
            raise Refused(f"job {job['_id']} is {job['state']}; only a PENDING job can be held")
        if action == "release" and job["state"] != JobState.HELD.value:
            raise Refused(f"job {job['_id']} is {job['state']}; only a HELD job can be released")
        head.jobs.hold(job["_id"], action == "hold")
        head.dirty = True
        return {"job_id": job["_id"], "state": head.jobs.jobs[job["_id"]]["state"]}
    _admin(head, caller, args)
    if action == "priority":
        job = _own(head, caller, args.get("job_id"), admin=True)
        value = args.get("value")
        levels = {"high": 100, "normal": 0, "low": -100}
        priority = levels.get(value) if isinstance(value, str) else value
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise Refused("priority must be high, normal, low or an integer")
        head.jobs.set_priority(job["_id"], priority)
        head.dirty = True
        return {"job_id": job["_id"], "priority": priority}
    if action in ("drain", "resume"):
        name = _str(args, "node")
        try:
            head.registry.set_drain(name, action == "drain", _str(args, "reason"))
        except KeyError:
            raise Refused(f"node {name!r} does not exist", 404) from None
        head.dirty = True
        return {"node": name, "drain": action == "drain"}
    if action in ("block", "unblock"):
        user = _str(args, "user")
        blocked = set(head.admin_policy.get("blocked_users", []))
        if user in ("", "ALL"):
            change = {"block_all": action == "block"}
        else:
            (blocked.add if action == "block" else blocked.discard)(user)
            change = {"blocked_users": sorted(blocked)}
        store.set_policy(**change)
        head.admin_policy.update(change)
        head.dirty = True  # pending jobs of that user wait (Blocked) or may start
        return {"user": user or "ALL", "blocked": action == "block"}
    raise Refused(f"unknown action {action!r}")


def metrics(head: "HeadServer", caller: Caller, args: dict) -> dict:
    """What /metrics shows: jobs and nodes by state, sync counters, the scheduler's pass time."""
    jobs: dict[str, int] = {}
    for job in head.jobs.shown():
        jobs[job["state"]] = jobs.get(job["state"], 0) + 1
    used = head.jobs.usage()
    nodes: dict[str, int] = {}
    for n in head.registry.nodes.values():
        state = head.registry.state_of(n, used.get(n.name, (0, 0))[0]).value
        nodes[state] = nodes.get(state, 0) + 1
    syncs = [j.get("progress") or {} for j in head.jobs.jobs.values() if j["kind"] == "sync"]
    return {"jobs": jobs, "nodes": nodes, "moved": dict(head.moved),
            "sync_bytes_in_flight": sum(p.get("bytes_done", 0) for p in syncs),
            "sync_rate": sum(p.get("rate", 0) for p in syncs), "pass_seconds": head.pass_seconds,
            "passes": head.passes, "waiters": sum(len(w) for w in head.waiters.values())}


HANDLERS: dict[str, Callable[..., Any]] = {
    "submit": submit,
    "cancel": lambda head, caller, args: cancel(head, caller, args, admin=False),
    "info": info,
    "wait": wait,
    "control": control,
    "delete": delete,
    "token": token,
    "metrics": metrics,
    "ping": lambda head, caller, args: {"pong": True, "user": caller.user},
    "stats": lambda head, caller, args: {
        "pending": len(head.jobs.requests), "active": len(head.jobs.jobs), "nodes": len(head.registry.nodes),
        "nodes_alive": sum(n.alive for n in head.registry.nodes.values()), "passes": head.passes,
        "last_pass_ms": round(head.pass_seconds * 1000, 3)},
}


def handle(head: "HeadServer", caller: Caller, request: Request) -> Reply:
    handler = HANDLERS.get(request.op)
    if handler is None:
        return Reply(ok=False, error=f"unknown operation {request.op!r}")
    if request.op != "ping" and not head.stale and not store.reachable():
        head.db_failed(f"request {request.op}", store.StoreError("the driver lost the server"))
    if head.stale and request.op != "ping":
        return Reply(ok=False, error="the database is unreachable; the head is waiting for it, try again shortly")
    try:
        return Reply(ok=True, data=handler(head, caller, request.args))
    except Later:
        raise  # the server keeps the request and answers it later
    except Refused as exc:
        return Reply(ok=False, error=str(exc), data={"status": exc.status})
    except (store.StoreError, store.DatabaseUnreachable) as exc:
        head.db_failed(f"request {request.op}", exc)
        return Reply(ok=False, error="the database is unreachable; the head is waiting for it, try again shortly")
    except store.DatabaseError as exc:
        return Reply(ok=False, error=f"the database refused the request: {str(exc)[:300]}")
