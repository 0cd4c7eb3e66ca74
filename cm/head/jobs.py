"""The head's table of unfinished jobs, and every change of state they go through.

Memory is for speed, the store (MongoDB; an in-memory one in the unit tests)
for truth: every change is a conditional write first and a change in memory
after, only if the write won. A write that loses (someone else moved the job)
reloads that job from the store and is logged. So a head killed at any point
restarts from what was stored. Finished jobs leave memory; they stay stored.

Each unfinished job is its stored record (``jobs``) and one ``Runtime``
(``runtime``) for what is not stored; both come and go together (``_keep``,
``_forget``). Time is the injected ``Clock``'s. Each change returns what the
server must do in an ``Outcome`` (commands for nodes, nodes to drain); nothing
here touches a socket. How jobs end is in cm.head.endings, its rules in
cm.head.rules.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Any, Callable, Iterable

from cm.head.endings import Endings
from cm.head.ids import JobIds
from cm.head.outcome import Outcome
from cm.head.progress import merge
from cm.head.recent import RecentJobs
from cm.head.records import Job, SlotRecord
from cm.head.resources import NodeView, Request, Running
from cm.head.rules import Clock, apply_fields, final_state, slot_key, stamp
from cm.head.runtime import Runtime
from cm.head.specs import demands_of, node_spec, request_of, writes_of
from cm.logs import event
from cm.protocol import ANY_RUN, ShareKey
from cm.states import FINAL_STATES, JobState
from cm.store.jobstore import JobStore

log = logging.getLogger("cm.head.jobs")

__all__ = ["JobTable", "final_state"]


class JobTable(Endings):
    def __init__(self, store: JobStore, stop_timeout: float = 8.0, transfer_secret: bytes | None = None,
                 clock: Clock | None = None) -> None:
        self.store = store
        self.clock = clock or Clock()
        # what every sync run's data-plane key is derived from (cm.keys.data_plane_key): the head's
        # RUN_DIR/keys/transfer.key; a table made without one (the unit tests) gets a random one
        self.transfer_secret = transfer_secret if transfer_secret is not None else os.urandom(32)
        # a share told to stop must be confirmed gone within this many seconds (the node's kill grace plus
        # a confirmation timeout); after that its slot is released and its node drained, like Slurm's
        # "Kill task failed"
        self.stop_timeout = stop_timeout
        # a share sent to a live node must start within this many seconds (time for an earlier run there to be
        # reaped first), or it is lost: nodes say why they refuse, so silence means the share went missing
        self.start_timeout = stop_timeout + 5.0
        self.node_alive: Callable[[str], bool] = lambda name: True  # the registry's view, set by the head
        self.addrs: Callable[[], dict[str, str]] = dict  # each node's transfer address, set by the head
        self.jobs: dict[int, Job] = {}
        self.runtime: dict[int, Runtime] = {}
        # indexes, which may name more than they should (a forgotten job), never less: node -> jobs that may
        # have a slot there; jobs with a held RUNNING write, oldest first; jobs told to stop
        self._by_node: dict[str, set[int]] | None = None
        self._holding: dict[int, None] = {}
        self._stopping: dict[int, None] = {}
        self.ids = JobIds(store.reserve_job_ids)
        self.recent = RecentJobs(now=self.clock.wall)
        self.lost_races = 0  # conditional writes another writer won (each one reloaded that job)

    # --- loading and views ---------------------------------------------------

    def load(self) -> None:
        self.jobs, self.runtime, self._by_node, self._holding, self._stopping = {}, {}, None, {}, {}
        for job in self.store.active_jobs():
            self._keep(job)  # type: ignore[arg-type]
        self.recent.load(self.store.recent_jobs(self.clock.wall() - self.recent.seconds, finished=True))
        event(log, "jobs loaded", active=len(self.jobs), pending=len(self.pending()))

    def _keep(self, job: Job) -> None:
        """Keep an unfinished job in memory, with a fresh Runtime (what is not stored is not known)."""
        self.jobs[job["_id"]] = job
        self.runtime[job["_id"]] = Runtime(sent_at=self.clock.mono())
        if job.get("slots"):
            self._by_node = None
        self._queued(job)

    def _forget(self, job_id: int) -> None:
        self.jobs.pop(job_id, None)
        self.runtime.pop(job_id, None)

    def _queued(self, job: Job) -> None:
        """A job's request and reason after it moved: the scheduler's for PENDING, Held, none for others."""
        rt = self.runtime[job["_id"]]
        state = job["state"]
        rt.request = request_of(job) if state == JobState.PENDING.value else None
        rt.reason = ("Held" if state == JobState.HELD.value else "None") if state in (
            JobState.PENDING.value, JobState.HELD.value) else None

    def pending(self) -> list[Request]:
        return [rt.request for rt in self.runtime.values() if rt.request is not None]

    def running(self) -> list[Running]:
        out = []
        for job in self.jobs.values():
            if JobState(job["state"]).active:
                start = job.get("started") or job.get("dispatched") or self.clock.wall()
                holds = [(s["node"], s["cpus"], s["mem_mb"]) for s in job["slots"] if not s["ended"]]
                out.append(Running(job["_id"], start + job["time_limit"], holds, writes_of(job)))
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
        """Jobs with a slot on node that has not ended (through an index: every heartbeat asks)."""
        if self._by_node is None:
            self._by_node = collections.defaultdict(set)
            for j in self.jobs.values():
                for s in j.get("slots", ()):
                    self._by_node[s["node"]].add(j["_id"])
        ids = self._by_node.get(node)
        if not ids:
            return []
        out = []
        for job_id in list(ids):
            job = self.jobs.get(job_id)
            if job is not None and any(s["node"] == node and not s["ended"] for s in job["slots"]):
                out.append(job)
            else:
                ids.discard(job_id)
        return out

    def shown(self) -> list[Job]:
        """What cminfo lists without --all: every unfinished job and the recently finished ones."""
        return [*self.recent.values(), *self.jobs.values()]

    def find(self, job_id: int) -> Job | None:
        """An unfinished or recently finished job from memory, else the stored one, else None."""
        return self.jobs.get(job_id) or self.recent.get(job_id) or self.store.get_job(job_id)

    def why_waiting(self, job_id: int) -> str | None:
        """Why a PENDING or HELD job waits (squeue's reason code); None for any other job."""
        rt = self.runtime.get(job_id)
        return rt.reason if rt is not None else None

    def stopping(self, job_id: int) -> bool:
        """Whether the job's shares were told to stop (it ends once they are gone)."""
        rt = self.runtime.get(job_id)
        return rt is not None and rt.stopping is not None

    def _stop_by(self, job_id: int, deadline: float, state: str) -> None:
        """The job's shares were told to stop: they must be gone by deadline (the first deadline stays)."""
        rt = self.runtime[job_id]
        if rt.stopping is None:
            rt.stopping = (deadline, state)
            self._stopping[job_id] = None

    # --- writing: the store first, memory after ------------------------------

    def submit(self, fields: dict[str, Any]) -> Job:
        """Store a new job (``fields`` without its id) and keep it; return its record."""
        job: Job = self.store.insert_job({**fields, "id": self.ids.next()})  # type: ignore[assignment]
        self._keep(job)
        return job

    def submitted_with(self, uid: int, key: str) -> int | None:
        """The id of the job this user submitted with this idempotency key, if any (memory, then the store)."""
        for job in (*self.recent.values(), *self.jobs.values()):
            if job.get("idempotency_key") == key and job["uid"] == uid:
                return job["_id"]
        stored = self.store.job_by_key(uid, key)
        return None if stored is None else stored["_id"]

    def delete(self, job_id: int) -> None:
        """Remove a final job from the store and from the recent ones; an unfinished job stays."""
        if job_id in self.jobs:
            return
        self.store.delete_job(job_id)
        self.recent.discard(job_id)

    def _lost(self, job: Job, wanted: str) -> None:
        """Another writer changed the job first: take the stored one as it is, and say so."""
        self.lost_races += 1
        fresh = self.store.get_job(job["_id"])
        event(log, "lost a race on a job", logging.WARNING, job=job["_id"], wanted=wanted,
              found=fresh and fresh["state"])
        self._forget(job["_id"])
        if fresh and fresh["state"] not in {s.value for s in FINAL_STATES}:
            self._keep(fresh)  # type: ignore[arg-type]

    def _write(self, job: Job, fields: dict[str, Any]) -> bool:
        """Set fields while the job keeps its state; then in memory. False (job reloaded) if it lost."""
        if not fields:
            return True
        if not self.store.update_job(job["_id"], [JobState(job["state"])], **fields):
            self._lost(job, f"update {sorted(fields)[:4]}")
            return False
        apply_fields(job, fields)
        return True

    def _move(self, job: Job, dst: JobState, **fields: Any) -> bool:
        """Conditional write, then memory. False (and the job reloaded) if someone else moved it."""
        src = JobState(job["state"])
        fields = {**self._take_held(job["_id"]), **fields}
        if not self.store.transition(job["_id"], src, dst, **fields):
            self._lost(job, dst.value)
            return False
        job["state"] = dst.value
        apply_fields(job, fields)
        if dst in FINAL_STATES:
            self._forget(job["_id"])
            self.recent.add(job)
        else:
            self._queued(job)
        event(log, "job state", job=job["_id"], state=dst.value,
              **({"exit_code": fields["exit_code"]} if "exit_code" in fields else {}))
        return True

    # --- write-behind of RUNNING ---------------------------------------------

    def _hold(self, job_id: int, **fields: Any) -> dict[str, Any]:
        """Add fields to the job's held RUNNING write (started: the first value stays); return them all."""
        rt = self.runtime[job_id]
        if rt.held is None:
            rt.held, rt.held_since = {}, self.clock.mono()
            self._holding[job_id] = None
        for key, value in fields.items():
            rt.held.setdefault(key, value) if key == "started" else rt.held.__setitem__(key, value)
        return rt.held

    def _take_held(self, job_id: int) -> dict[str, Any]:
        """The job's held fields (to write now with its next change), forgotten there."""
        self._holding.pop(job_id, None)
        rt = self.runtime.get(job_id)
        if rt is None or rt.held is None:
            return {}
        held, rt.held = rt.held, None
        return held

    def flush(self, older_than: float = 0.0) -> None:
        """Write the RUNNING transitions held back for longer than older_than seconds."""
        now = self.clock.mono() if older_than else float("inf")
        for job_id in list(self._holding):
            rt, job = self.runtime.get(job_id), self.jobs.get(job_id)
            if rt is None or job is None or rt.held is None or job["state"] != JobState.DISPATCHING.value:
                self._take_held(job_id)
                continue
            if now - rt.held_since < older_than:
                break  # oldest first: the rest are younger
            self._move(job, JobState.RUNNING)

    def unsaved(self, job_id: int) -> bool:
        rt = self.runtime.get(job_id)
        return rt is not None and rt.held is not None

    def next_flush(self, hold: float) -> float | None:
        """When the oldest held RUNNING write is due (monotonic), or None."""
        for job_id in self._holding:
            rt = self.runtime.get(job_id)
            if rt is not None and rt.held is not None:
                return rt.held_since + hold
        return None

    # --- what happens to jobs ------------------------------------------------

    def dispatch(self, job_id: int, assignment: list[list[str]], addrs: dict[str, str], out: Outcome) -> None:
        """PENDING -> DISPATCHING on the assigned nodes; queue the RunJob commands."""
        job = self.jobs[job_id]
        slots = []
        for demand, names in zip(demands_of(job), assignment):
            for rank, name in enumerate(names):
                slots.append(SlotRecord(node=name, rank=rank, role=demand.role, cpus=demand.cpus,
                                        mem_mb=demand.mem_mb, started=False, ended=False, state="", exit_code=0))
        if not self._move(job, JobState.DISPATCHING, slots=slots, runs=job.get("runs", 0) + 1,
                          dispatched=self.clock.wall()):
            return
        if self._by_node is not None:
            for s in slots:
                self._by_node[s["node"]].add(job_id)
        self.runtime[job_id].new_run(self.clock.mono())
        # a sync's destinations first: a sender may only connect once its receiver knows the transfer
        for s in slots:
            if job["kind"] != "sync" or s["role"] == "dst":
                out.run.append((s["node"], job_id, node_spec(job, s, addrs, self.transfer_secret)))

    @staticmethod
    def matching(job: Job, node: str, role: str, rank: int) -> list[int]:
        """Indices of the job's slots on node that (role, rank) names, as a ShareKey pattern names shares."""
        pattern = ShareKey(job["_id"], ANY_RUN, role, rank)
        return [i for i, s in enumerate(job["slots"]) if s["node"] == node and pattern.matches(slot_key(job, s))]

    def started(self, job_id: int, node: str, run: int, addrs: dict[str, str], out: Outcome,
                role: str = "", rank: int = 0, at: float = 0.0) -> None:
        """A share of a job started (``at``: when, by its node's clock)."""
        job = self.jobs.get(job_id)
        if job is None or job.get("runs") != run or not JobState(job["state"]).active:
            return
        rt = self.runtime[job_id]
        for i in self.matching(job, node, role, rank):
            s = job["slots"][i]
            if s["started"]:
                continue
            if job["state"] == JobState.DISPATCHING.value and s["role"] != "dst":
                # written behind: the node's JobStarted is acknowledged once it is
                held = self._hold(job_id, started=stamp(at, job.get("dispatched"), self.clock.wall()),
                                  **{f"slots.{i}.started": True})
                s["started"], job["started"] = True, held["started"]
            elif rt.held is not None:
                self._hold(job_id, **{f"slots.{i}.started": True})
                s["started"] = True
            elif not self._write(job, {f"slots.{i}.started": True}):
                return
        self._send_senders(job, addrs, out)

    def _send_senders(self, job: Job, addrs: dict[str, str], out: Outcome) -> None:
        """A sync's senders start once every receiver has (once per run, not while it is being stopped)."""
        rt = self.runtime[job["_id"]]
        if job["kind"] != "sync" or rt.stopping is not None or rt.src_sent:
            return
        if all(s["started"] for s in job["slots"] if s["role"] == "dst"):
            rt.src_sent, rt.sent_at = True, self.clock.mono()
            for s in job["slots"]:
                if s["role"] == "src" and not s["ended"]:
                    out.run.append((s["node"], job["_id"], node_spec(job, s, addrs, self.transfer_secret)))

    def wants(self, node: str, job_id: int, run: int | None, role: str = "", rank: int = 0) -> bool:
        """Whether run `run` of the job still has a share (of that role and rank) on node that has not ended."""
        job = self.jobs.get(job_id)
        return (job is not None and JobState(job["state"]).active and job.get("runs") == run
                and any(not job["slots"][i]["ended"] for i in self.matching(job, node, role, rank)))

    def set_reasons(self, reasons: dict[int, str], blocked: Callable[[Job], bool]) -> None:
        """Why each pending job waits, after a scheduler pass (memory only: it changes with every pass)."""
        for job_id, rt in self.runtime.items():
            if rt.request is not None:
                rt.reason = "Blocked" if blocked(self.jobs[job_id]) else reasons.get(job_id, "None")

    def hold(self, job_id: int, held: bool) -> bool:
        """PENDING -> HELD (or back); False if the job moved meanwhile (it is reloaded)."""
        job = self.jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return self._move(job, JobState.HELD if held else JobState.PENDING)

    def set_priority(self, job_id: int, priority: int) -> bool:
        job = self.jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if not self._write(job, {"priority": priority}):
            return False
        rt = self.runtime[job_id]
        if rt.request is not None:
            rt.request = request_of(job)
        return True

    def progress(self, job_id: int, node: str, run: int, report: dict[str, Any]) -> None:
        """A sender rank's progress (cm.head.progress.report_of), merged into the job's (memory only)."""
        job = self.jobs.get(job_id)
        if job is None or job.get("runs") != run:
            return
        per_node = self.runtime[job_id].progress
        if not report["stats"] and per_node.get(node, {}).get("stats"):
            return  # a late running report must not hide the final one
        per_node[node] = report
        job["progress"] = merge(per_node)

    def views(self, nodes: Iterable) -> dict[str, NodeView]:
        used = self.usage()
        out = {}
        for n in nodes:
            c, m = used.get(n.name, (0, 0))
            out[n.name] = NodeView(n.name, n.partition, n.cpus, n.mem_mb, c, m, usable=n.alive and not n.drain)
        return out
