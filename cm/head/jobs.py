"""The head's table of unfinished jobs: memory for speed, MongoDB for truth.

Every change is written through to the database with a conditional update
before it is made in memory, so a head killed at any point restarts from
what was stored. Finished jobs leave memory; they stay in the database.
"""

from __future__ import annotations

import collections
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from cm import store
from cm.head.resources import Demand, NodeView, Request, Running
from cm.logs import event
from cm.states import FINAL_STATES, JobState

log = logging.getLogger("cm.head.jobs")

Job = dict[str, Any]  # the stored document
from cm.transfer.exitcodes import TRANSIENT as TRANSIENT_EXIT  # a sender lost its receiver: run the sync again
SYNC_RESTARTS = 5


@dataclass
class Outcome:
    """What the server must do after a change: commands for nodes, whether to schedule."""

    run: list[tuple[str, int, dict]] = field(default_factory=list)  # (node, job_id, spec)
    kill: list[tuple[str, int, str]] = field(default_factory=list)  # (node, job_id, state)
    finished: list[int] = field(default_factory=list)


def demands_of(job: Job) -> tuple[Demand, ...]:
    if job["kind"] == "sync":
        sync = job["sync"]
        n = job["nodes"]
        return (
            Demand("src", n, 1, 0, partition=sync["src"].get("partition", ""), node=sync["src"].get("node", "")),
            Demand("dst", n, 1, 0, partition=sync["dst"].get("partition", ""), node=sync["dst"].get("node", "")),
        )
    return (Demand("run", job["nodes"], job["cpus"], job["mem_mb"], partition=job["partition"]),)


def request_of(job: Job) -> Request:
    return Request(job["_id"], job.get("priority", 0), job["submitted"], job["time_limit"], demands_of(job))


def final_state(job: Job) -> tuple[JobState, int]:
    """The state and exit code of a job whose every slot has ended."""
    slots = sorted((s for s in job["slots"] if s["role"] != "dst"), key=lambda s: s["rank"])
    states = {s["state"] for s in slots}
    exit_code = next((s["exit_code"] for s in slots if s["exit_code"] != 0), 0)
    if job.get("cancel_requested"):
        return JobState.CANCELLED, exit_code
    for severe in (JobState.TIMEOUT, JobState.NODE_FAIL, JobState.CANCELLED):
        if severe.value in states:
            return severe, exit_code
    if exit_code or JobState.FAILED.value in states:
        return JobState.FAILED, exit_code or 1
    return JobState.COMPLETED, 0


class JobTable:
    ID_BLOCK = 64
    RECENT_SECONDS = 300.0  # finished jobs cminfo shows without --all
    RECENT_MAX = 20000

    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}
        self.requests: dict[int, Request] = {}
        self.ids: Iterator[int] = iter(())
        # finished jobs, newest last: cminfo shows them without scanning the database
        self.recent: collections.OrderedDict[int, Job] = collections.OrderedDict()
        # DISPATCHING -> RUNNING writes held back a moment (RUNNING_HOLD), so a job that starts and
        # ends within it costs one write; the node's JobStarted is acknowledged only once written
        self.unsaved_running: dict[int, dict[str, Any]] = {}
        self.unsaved_since: dict[int, float] = {}

    def next_id(self) -> int:
        for job_id in self.ids:
            return job_id
        self.ids = iter(store.reserve_job_ids(self.ID_BLOCK))
        return next(self.ids)

    # --- loading and views ---------------------------------------------------

    def load(self) -> None:
        self.jobs = {j["_id"]: j for j in store.active_jobs()}
        self.recent = collections.OrderedDict(
            (j["_id"], j) for j in sorted(store.recent_jobs(time.time() - self.RECENT_SECONDS, finished=True),
                                          key=lambda j: j["ended"]))
        self.unsaved_running, self.unsaved_since = {}, {}
        self.requests = {i: request_of(j) for i, j in self.jobs.items() if j["state"] == JobState.PENDING.value}
        event(log, "jobs loaded", active=len(self.jobs), pending=len(self.requests))

    def pending(self) -> list[Request]:
        return list(self.requests.values())

    def running(self) -> list[Running]:
        out = []
        for job in self.jobs.values():
            if JobState(job["state"]).active:
                start = job.get("started") or job.get("dispatched") or time.time()
                holds = [(s["node"], s["cpus"], s["mem_mb"]) for s in job["slots"] if not s["ended"]]
                out.append(Running(job["_id"], start + job["time_limit"], holds))
        return out

    def usage(self) -> dict[str, tuple[int, int]]:
        """CPUs and MB in use on each node, derived from the active jobs' slots."""
        used: dict[str, tuple[int, int]] = {}
        for job in self.jobs.values():
            if JobState(job["state"]).active:
                for s in job["slots"]:
                    if not s["ended"]:
                        c, m = used.get(s["node"], (0, 0))
                        used[s["node"]] = (c + s["cpus"], m + s["mem_mb"])
        return used

    def on_node(self, node: str) -> list[Job]:
        return [j for j in self.jobs.values() if any(s["node"] == node and not s["ended"] for s in j["slots"])]

    # --- changes ---------------------------------------------------------------

    def add(self, job: Job) -> None:
        self.jobs[job["_id"]] = job
        if job["state"] == JobState.PENDING.value:
            self.requests[job["_id"]] = request_of(job)

    def _move(self, job: Job, dst: JobState, **fields: Any) -> bool:
        """Conditional write, then memory. False (and the job reloaded) if someone else moved it."""
        src = JobState(job["state"])
        fields = {**self.unsaved_running.pop(job["_id"], {}), **fields}
        self.unsaved_since.pop(job["_id"], None)
        if not store.transition(job["_id"], src, dst, **fields):
            fresh = store.get_job(job["_id"])
            event(log, "lost a race on a job", logging.WARNING, job=job["_id"], wanted=dst.value,
                  found=fresh and fresh["state"])
            self._forget(job["_id"])
            if fresh and fresh["state"] not in {s.value for s in FINAL_STATES}:
                self.add(fresh)
            return False
        job["state"] = dst.value
        for key, value in fields.items():
            if "." not in key:
                job[key] = value
        if dst != JobState.PENDING:
            self.requests.pop(job["_id"], None)
        else:
            self.requests[job["_id"]] = request_of(job)
        if dst in FINAL_STATES:
            self._forget(job["_id"])
            self.recent[job["_id"]] = job
            self._prune_recent()
        event(log, "job state", job=job["_id"], state=dst.value, **({"exit_code": fields["exit_code"]} if "exit_code" in fields else {}))
        return True

    def _prune_recent(self) -> None:
        oldest = time.time() - self.RECENT_SECONDS
        while self.recent:
            job = next(iter(self.recent.values()))
            if len(self.recent) <= self.RECENT_MAX and (job.get("ended") or 0) >= oldest:
                break
            self.recent.popitem(last=False)

    def shown(self) -> list[Job]:
        """What cminfo lists without --all: every unfinished job and the recently finished ones."""
        self._prune_recent()
        return [*self.recent.values(), *self.jobs.values()]

    def _forget(self, job_id: int) -> None:
        self.jobs.pop(job_id, None)
        self.requests.pop(job_id, None)
        self.unsaved_running.pop(job_id, None)
        self.unsaved_since.pop(job_id, None)

    def flush(self, older_than: float = 0.0) -> None:
        """Write the RUNNING transitions held back for longer than older_than seconds."""
        now = time.monotonic()
        for job_id in list(self.unsaved_running):
            if now - self.unsaved_since.get(job_id, 0.0) < older_than:
                continue
            job = self.jobs.get(job_id)
            if job is None or job["state"] != JobState.DISPATCHING.value:
                self.unsaved_running.pop(job_id, None)
                self.unsaved_since.pop(job_id, None)
                continue
            self._move(job, JobState.RUNNING)

    def unsaved(self, job_id: int) -> bool:
        return job_id in self.unsaved_running

    def next_flush(self, hold: float) -> float | None:
        """When the oldest held RUNNING write is due (monotonic), or None."""
        return min(self.unsaved_since.values()) + hold if self.unsaved_since else None

    def dispatch(self, job_id: int, assignment: list[list[str]], addrs: dict[str, str], out: Outcome) -> None:
        """PENDING -> DISPATCHING on the assigned nodes; queue the RunJob commands."""
        job = self.jobs[job_id]
        demands = demands_of(job)
        slots = []
        for demand, names in zip(demands, assignment):
            for rank, name in enumerate(names):
                slots.append(
                    {"node": name, "rank": rank, "role": demand.role, "cpus": demand.cpus, "mem_mb": demand.mem_mb,
                     "started": False, "ended": False, "state": "", "exit_code": 0}
                )
        run = job.get("runs", 0) + 1
        now = time.time()
        if not self._move(job, JobState.DISPATCHING, slots=slots, runs=run, dispatched=now):
            return
        job["src_sent"] = False  # this run's senders start once its receivers have
        job.pop("node_progress", None)
        if job["kind"] == "sync":
            # destinations first: a sender may only connect once its receiver knows the transfer
            for s in slots:
                if s["role"] == "dst":
                    out.run.append((s["node"], job_id, self.spec(job, s, addrs)))
        else:
            for s in slots:
                out.run.append((s["node"], job_id, self.spec(job, s, addrs)))

    def spec(self, job: Job, slot: dict, addrs: dict[str, str]) -> dict:
        """What a node needs to run its share of a job."""
        base = {"kind": job["kind"], "run": job["runs"], "role": slot["role"], "rank": slot["rank"],
                "name": job["name"], "user": job["user"], "uid": job["uid"], "gid": job["gid"],
                "time_limit": job["time_limit"], "cwd": job["cwd"]}
        if job["kind"] == "command":
            nodelist = [s["node"] for s in job["slots"]]
            return {**base, "env": job["env"], "argv": job["argv"], "procs": job["procs"],
                    "nnodes": len(nodelist), "nodelist": nodelist, "stdout": job["stdout"], "stderr": job["stderr"],
                    "cpus": slot["cpus"]}
        sync = job["sync"]
        transfer_id = f"{job['_id']}.{job['runs']}"
        # each run its own 128-bit data-plane token: one run's token opens no other run's transfer
        token = hmac.new(bytes.fromhex(sync["token"]), transfer_id.encode(), "sha256").hexdigest()[:32]
        transfer = {"transfer_id": transfer_id, "token": token}
        if slot["role"] == "dst":
            return {**base, "transfer": {**transfer, "dst_path": sync["dst"]["path"],
                                         "owners": bool(sync["options"].get("owners"))}}
        dst = next(s for s in job["slots"] if s["role"] == "dst" and s["rank"] == slot["rank"])
        host, _, port = addrs.get(dst["node"], ":0").rpartition(":")
        nranks = sum(1 for s in job["slots"] if s["role"] == "src")
        return {**base, "transfer": {**transfer, **sync["options"], "src_path": sync["src"]["path"],
                                     "dst_host": host, "dst_port": int(port or 0), "rank": slot["rank"],
                                     "nranks": nranks}}

    def started(self, job_id: int, node: str, run: int, addrs: dict[str, str], out: Outcome) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.get("runs") != run or not JobState(job["state"]).active:
            return
        for i, s in enumerate(job["slots"]):
            if s["node"] == node and not s["started"]:
                s["started"] = True
                if job["state"] == JobState.DISPATCHING.value and s["role"] != "dst":
                    self.unsaved_since.setdefault(job_id, time.monotonic())
                    unsaved = self.unsaved_running.setdefault(job_id, {})
                    unsaved.setdefault("started", time.time())
                    unsaved[f"slots.{i}.started"] = True
                    job["started"] = unsaved["started"]
                elif job_id in self.unsaved_running:
                    self.unsaved_running[job_id][f"slots.{i}.started"] = True
                else:
                    store.update_job(job_id, [JobState(job["state"])], **{f"slots.{i}.started": True})
        if job["kind"] == "sync":
            dst = [s for s in job["slots"] if s["role"] == "dst"]
            if all(s["started"] for s in dst) and not job.get("src_sent"):
                job["src_sent"] = True
                for s in job["slots"]:
                    if s["role"] == "src":
                        out.run.append((s["node"], job_id, self.spec(job, s, addrs)))

    def ended(self, job_id: int, node: str, run: int, state: JobState, exit_code: int, reason: str,
              out: Outcome) -> None:
        """One node's share of a job is over; finish the job when every share is."""
        job = self.jobs.get(job_id)
        if job is None or job.get("runs") != run or not JobState(job["state"]).active:
            return
        mine = [i for i, s in enumerate(job["slots"]) if s["node"] == node and not s["ended"]]
        mine.sort(key=lambda i: job["slots"][i]["role"] == "dst")  # a node's sender before its receiver
        if (mine and job["kind"] == "sync" and exit_code == TRANSIENT_EXIT and not job.get("cancel_requested")
                and job.get("restarts", 0) < SYNC_RESTARTS):
            self._restart_sync(job, node, f"{node}: {reason or 'lost its receiver'}", out, alive=None)
            return
        self._end_slots(job, mine[:1], state, exit_code, reason, out)

    def wants(self, node: str, job_id: int, run: int | None) -> bool:
        """Whether run `run` of the job still has a share on node that has not ended."""
        job = self.jobs.get(job_id)
        return (job is not None and JobState(job["state"]).active and job.get("runs") == run
                and any(s["node"] == node and not s["ended"] for s in job["slots"]))

    def resend(self, addrs: dict[str, str], out: Outcome) -> None:
        """RunJob again for every share of an active job not yet over (senders only once receivers started)."""
        for job in self.jobs.values():
            if not JobState(job["state"]).active:
                continue
            receivers_ready = all(s["started"] for s in job["slots"] if s["role"] == "dst")
            for s in job["slots"]:
                if s["ended"] or (s["role"] == "src" and not receivers_ready):
                    continue
                if s["role"] == "src":
                    job["src_sent"] = True
                out.run.append((s["node"], job["_id"], self.spec(job, s, addrs)))

    def _end_slots(self, job: Job, indices: list[int], state: JobState, exit_code: int, reason: str,
                   out: Outcome) -> None:
        if not indices:
            return
        fields: dict[str, Any] = {}
        for i in indices:
            job["slots"][i].update(ended=True, started=True, state=state.value, exit_code=exit_code)
            fields.update({f"slots.{i}.ended": True, f"slots.{i}.started": True, f"slots.{i}.state": state.value,
                           f"slots.{i}.exit_code": exit_code})
        if reason and not job.get("reason"):
            fields["reason"] = job["reason"] = reason
        lost_receiver = any(job["slots"][i]["role"] == "dst" for i in indices)
        if lost_receiver and state == JobState.COMPLETED:
            state = JobState.FAILED
        if state in (JobState.TIMEOUT, JobState.NODE_FAIL, JobState.CANCELLED) or lost_receiver:
            # one share stopped by force, or a receiver is gone: the rest of the job goes too
            for i, s in enumerate(job["slots"]):
                if s["ended"] or s["role"] == "dst":
                    continue
                if s["role"] == "src" and not job.get("src_sent"):
                    # never told to start: nothing to stop
                    s.update(ended=True, state=state.value, exit_code=exit_code)
                    fields.update({f"slots.{i}.ended": True, f"slots.{i}.state": state.value,
                                   f"slots.{i}.exit_code": exit_code})
                else:
                    out.kill.append((s["node"], job["_id"], state.value))
        if any(s["role"] != "dst" and not s["ended"] for s in job["slots"]):
            store.update_job(job["_id"], [JobState(job["state"])], **fields)
        else:
            self._finish(job, out, fields)

    def _finish(self, job: Job, out: Outcome, fields: dict[str, Any]) -> None:
        final, exit_code = final_state(job)
        for i, s in enumerate(job["slots"]):
            if s["role"] == "dst" and not s["ended"]:
                out.kill.append((s["node"], job["_id"], final.value))  # releases the receiver
                s["ended"] = True
                fields[f"slots.{i}.ended"] = True
        if job.get("progress"):
            fields["progress"] = {**job["progress"], "rate": 0}
        if self._move(job, final, ended=time.time(), exit_code=exit_code, **fields):
            out.finished.append(job["_id"])

    def cancel(self, job_id: int, out: Outcome) -> str:
        """Cancel a job; return what happened, in words."""
        job = self.jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        state = JobState(job["state"])
        if state in (JobState.PENDING, JobState.HELD):
            self._move(job, JobState.CANCELLED, ended=time.time(), exit_code=0)
            out.finished.append(job_id)
            return "cancelled"
        job["cancel_requested"] = True
        store.update_job(job_id, [state], cancel_requested=True)
        for s in job["slots"]:
            if not s["ended"] and s["role"] != "dst":
                out.kill.append((s["node"], job_id, JobState.CANCELLED.value))
        if all(s["ended"] for s in job["slots"] if s["role"] != "dst"):
            self._finish(job, out, {})
        return "cancelling"

    def node_lost(self, node: str, reason: str, out: Outcome, alive: dict[str, int]) -> None:
        """A node is DOWN or its daemon restarted: its shares of jobs are gone.

        `alive` counts the usable nodes of each partition: a sync job starts
        again on as many as remain (what was verified is not sent again).
        """
        for job in self.on_node(node):
            if job["kind"] == "sync" and not job.get("cancel_requested"):
                self._restart_sync(job, node, reason, out, alive)
                continue
            if job.get("requeue") and not job.get("cancel_requested") and job["kind"] == "command":
                for s in job["slots"]:
                    if not s["ended"] and s["node"] != node:
                        out.kill.append((s["node"], job["_id"], JobState.NODE_FAIL.value))
                self._move(job, JobState.PENDING, slots=[], reason=f"requeued: {reason}", started=None)
                continue
            lost = [i for i, s in enumerate(job["slots"]) if s["node"] == node and not s["ended"]]
            self._end_slots(job, lost, JobState.NODE_FAIL, -1, reason, out)

    def _restart_sync(self, job: Job, node: str, reason: str, out: Outcome, alive: dict[str, int] | None) -> None:
        """Stop this run's other parts and queue the sync again, on as many nodes as remain alive."""
        for s in job["slots"]:
            if not s["ended"] and s["node"] != node:
                out.kill.append((s["node"], job["_id"], JobState.NODE_FAIL.value))
        nodes = job["nodes"]
        if alive is not None:
            sync = job["sync"]
            nodes = min([nodes] + [alive.get(sync[side]["partition"], 0)
                                   for side in ("src", "dst") if sync[side].get("partition")])
        self._move(job, JobState.PENDING, slots=[], nodes=max(1, nodes), started=None,
                   restarts=job.get("restarts", 0) + 1, reason=f"restarting: {reason}")

    def hold(self, job_id: int, held: bool) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        self._move(job, JobState.HELD if held else JobState.PENDING)

    def set_priority(self, job_id: int, priority: int) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if store.update_job(job_id, [JobState(job["state"])], priority=priority):
            job["priority"] = priority
            if job_id in self.requests:
                self.requests[job_id] = request_of(job)

    def progress(self, job_id: int, node: str, run: int, report: dict) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.get("runs") != run:
            return
        per_node = job.setdefault("node_progress", {})
        if not report["stats"] and per_node.get(node, {}).get("stats"):
            return  # a late running report must not hide the final one
        per_node[node] = report
        total: dict[str, Any] = {k: sum(p[k] for p in per_node.values())
                                 for k in ("bytes_done", "bytes_total", "files_done", "files_total", "rate")}
        stats: dict[str, int] = {}
        for p in per_node.values():
            for k, v in p["stats"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    stats[k] = stats.get(k, 0) + v
        if stats:
            total["stats"] = stats
        job["progress"] = total

    def views(self, nodes: Iterable) -> dict[str, NodeView]:
        used = self.usage()
        out = {}
        for n in nodes:
            c, m = used.get(n.name, (0, 0))
            out[n.name] = NodeView(n.name, n.partition, n.cpus, n.mem_mb, c, m, usable=n.alive and not n.drain)
        return out
