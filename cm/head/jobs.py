"""The head's table of unfinished jobs, and every change of state they go through.

Memory is for speed, the store (MongoDB; an in-memory one in the unit tests)
for truth: every change is a conditional write first and a change in memory
after, only if the write won. A write that loses (someone else moved the job)
reloads that job from the store and is logged. So a head killed at any point
restarts from what was stored. Finished jobs leave memory; they stay stored.

Each change returns what the server must do in an ``Outcome`` (commands for
nodes, nodes to drain); nothing here touches a socket.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any, Callable, Iterable

from cm.head.ids import JobIds
from cm.head.outcome import Outcome, Stop, stop_slot
from cm.head.progress import merge
from cm.head.recent import RecentJobs
from cm.head.records import Job, SlotRecord
from cm.protocol import ANY_RUN, ShareKey
from cm.head.resources import NodeView, Request, Running
from cm.head.specs import demands_of, node_spec, request_of, writes_of
from cm.head.writebehind import HeldStarts
from cm.logs import event
from cm.states import FINAL_STATES, JobState
from cm.store.jobstore import JobStore
from cm.transfer.exitcodes import TRANSIENT as TRANSIENT_EXIT  # a sender lost its receiver: run the sync again

log = logging.getLogger("cm.head.jobs")

SYNC_RESTARTS = 5
FORCED = (JobState.TIMEOUT, JobState.NODE_FAIL, JobState.CANCELLED)  # a share stopped by force stops the job

__all__ = ["JobTable", "final_state"]

def final_state(job: Job) -> tuple[JobState, int]:
    """The state and exit code of a job whose every slot has ended."""
    slots = sorted((s for s in job["slots"] if s["role"] != "dst"), key=lambda s: s["rank"])
    states = {s["state"] for s in slots}
    exit_code = next((s["exit_code"] for s in slots if s["exit_code"] != 0), 0)
    if job.get("cancel_requested"):
        return JobState.CANCELLED, exit_code
    for severe in FORCED:
        if severe.value in states:
            return severe, exit_code
    if JobState.FAILED.value in states:
        return JobState.FAILED, next((s["exit_code"] for s in slots
                                      if s["state"] == JobState.FAILED.value and s["exit_code"]), exit_code or 1)
    return JobState.COMPLETED, exit_code  # 0, or a sync's 24: copied all but files that vanished (exitcodes)


def slot_key(job: Job, slot: SlotRecord) -> ShareKey:
    """The share a slot of the job's current run is, as its node names it."""
    return ShareKey(job["_id"], job.get("runs", 0), slot["role"], slot["rank"])


def stamp(at: float, floor: float | None) -> float:
    """When something happened by a node's clock (``at``; 0: not said), as the job's time: not after now (the
    head's clock), not before ``floor`` (what came before it). A head that was down when it happened still
    gets the real time, so a job's elapsed time does not count the head's downtime."""
    now = time.time()
    return max(floor or 0.0, min(at, now)) if at else now


def apply_fields(job: Job, fields: dict[str, Any]) -> None:
    """Make in memory the change ``fields`` made in the store (``slots.N.key``: one slot's key)."""
    for key, value in fields.items():
        if key.startswith("slots."):
            _, index, name = key.split(".", 2)
            job["slots"][int(index)][name] = value  # type: ignore[literal-required]
        elif "." not in key:
            job[key] = value  # type: ignore[literal-required]


def preview(job: Job, fields: dict[str, Any]) -> Job:
    """The job as it will be once ``fields`` are written (memory is changed only after the write)."""
    view: Job = {**job, "slots": [SlotRecord(**s) for s in job.get("slots", ())]}  # type: ignore[typeddict-item]
    apply_fields(view, fields)
    return view


class JobTable:
    def __init__(self, store: JobStore, stop_timeout: float = 8.0, transfer_secret: bytes | None = None) -> None:
        self.store = store
        # what every sync run's data-plane key is derived from (cm.keys.data_plane_key): the head's
        # RUN_DIR/keys/transfer.key; a table made without one (the unit tests) gets a random one
        self.transfer_secret = transfer_secret if transfer_secret is not None else os.urandom(32)
        # a share told to stop must be confirmed gone within this many seconds (the node's kill grace plus
        # a confirmation timeout); after that its slot is released and its node drained, like Slurm's
        # "Kill task failed"
        self.stop_timeout = stop_timeout
        self.node_alive: Callable[[str], bool] = lambda name: True  # the registry's view, set by the server
        self.stopping: dict[int, tuple[float, str]] = {}  # job -> (monotonic deadline, state its shares end in)
        # a share sent to a live node must start within this many seconds (time for an earlier run there to be
        # reaped first), or it is lost: nodes say why they refuse, so silence means the share went missing
        self.start_timeout = stop_timeout + 5.0
        self.sent_at: dict[int, float] = {}  # job -> when its latest RunJobs went out (monotonic)
        # memory only, never stored: why each waiting job waits (Held, Blocked, the scheduler's reason),
        # the jobs whose current run's senders were told to start, each sync's progress by sender rank
        self.reasons: dict[int, str] = {}
        self.src_sent: set[int] = set()
        self.node_progress: dict[int, dict[str, dict[str, Any]]] = {}
        self.ended_at: dict[int, float] = {}  # job -> the latest end of a share of its current run (node's clock)
        self.jobs: dict[int, Job] = {}
        self._by_node: dict[str, set[int]] | None = None  # node -> jobs that may have a slot there
        self.requests: dict[int, Request] = {}
        self.ids = JobIds(store.reserve_job_ids)
        self.recent = RecentJobs()
        self.held = HeldStarts()
        self.lost_races = 0  # conditional writes another writer won (each one reloaded that job)

    # --- loading and views ---------------------------------------------------

    def load(self) -> None:
        self.jobs = {j["_id"]: j for j in self.store.active_jobs()}
        self._by_node = None
        self.recent.load(self.store.recent_jobs(time.time() - self.recent.seconds, finished=True))
        self.held = HeldStarts()
        self.stopping, self.reasons, self.sent_at, self.src_sent, self.node_progress = {}, {}, {}, set(), {}
        self.ended_at = {}
        self.requests = {i: request_of(j) for i, j in self.jobs.items() if j["state"] == JobState.PENDING.value}
        for j in self.jobs.values():
            self._waits(j)
        event(log, "jobs loaded", active=len(self.jobs), pending=len(self.requests))

    def pending(self) -> list[Request]:
        return list(self.requests.values())

    def running(self) -> list[Running]:
        out = []
        for job in self.jobs.values():
            if JobState(job["state"]).active:
                start = job.get("started") or job.get("dispatched") or time.time()
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
        for job_id in list(ids):  # the index may name more than it should; never less
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

    # --- writing: the store first, memory after ------------------------------

    def add(self, job: Job) -> None:
        self.jobs[job["_id"]] = job
        if job.get("slots"):
            self._by_node = None
        if job["state"] == JobState.PENDING.value:
            self.requests[job["_id"]] = request_of(job)
        self._waits(job)

    def _waits(self, job: Job) -> None:
        """A waiting job's reason until the next scheduler pass says better; none for others."""
        if job["state"] in (JobState.PENDING.value, JobState.HELD.value):
            self.reasons[job["_id"]] = "Held" if job["state"] == JobState.HELD.value else "None"
        else:
            self.reasons.pop(job["_id"], None)

    def why_waiting(self, job_id: int) -> str | None:
        """Why a PENDING or HELD job waits (squeue's reason code); None for any other job."""
        return self.reasons.get(job_id)

    def submit(self, fields: dict[str, Any]) -> Job:
        """Store a new job (``fields`` without its id) and keep it; return its record."""
        job: Job = self.store.insert_job({**fields, "id": self.ids.next()})  # type: ignore[assignment]
        self.add(job)
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
            self.add(fresh)  # type: ignore[arg-type]

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
        fields = {**self.held.take(job["_id"]), **fields}
        if not self.store.transition(job["_id"], src, dst, **fields):
            self._lost(job, dst.value)
            return False
        job["state"] = dst.value
        apply_fields(job, fields)
        if dst != JobState.PENDING:
            self.requests.pop(job["_id"], None)
        else:
            self.requests[job["_id"]] = request_of(job)
        self._waits(job)
        if dst in FINAL_STATES:
            self._forget(job["_id"])
            self.recent.add(job)
        event(log, "job state", job=job["_id"], state=dst.value, **({"exit_code": fields["exit_code"]} if "exit_code" in fields else {}))
        return True

    def _forget(self, job_id: int) -> None:
        self.jobs.pop(job_id, None)
        self.requests.pop(job_id, None)
        self.stopping.pop(job_id, None)
        self.reasons.pop(job_id, None)
        self.sent_at.pop(job_id, None)
        self.src_sent.discard(job_id)
        self.node_progress.pop(job_id, None)
        self.ended_at.pop(job_id, None)
        self.held.take(job_id)

    # --- write-behind of RUNNING ---------------------------------------------

    def flush(self, older_than: float = 0.0) -> None:
        """Write the RUNNING transitions held back for longer than older_than seconds."""
        for job_id in self.held.due(older_than):
            job = self.jobs.get(job_id)
            if job is None or job["state"] != JobState.DISPATCHING.value:
                self.held.take(job_id)
                continue
            self._move(job, JobState.RUNNING)

    def unsaved(self, job_id: int) -> bool:
        return job_id in self.held

    def next_flush(self, hold: float) -> float | None:
        """When the oldest held RUNNING write is due (monotonic), or None."""
        return self.held.next_due(hold)

    # --- what happens to jobs ------------------------------------------------

    def dispatch(self, job_id: int, assignment: list[list[str]], addrs: dict[str, str], out: Outcome) -> None:
        """PENDING -> DISPATCHING on the assigned nodes; queue the RunJob commands."""
        job = self.jobs[job_id]
        slots = []
        for demand, names in zip(demands_of(job), assignment):
            for rank, name in enumerate(names):
                slots.append(SlotRecord(node=name, rank=rank, role=demand.role, cpus=demand.cpus,
                                        mem_mb=demand.mem_mb, started=False, ended=False, state="", exit_code=0))
        if not self._move(job, JobState.DISPATCHING, slots=slots, runs=job.get("runs", 0) + 1, dispatched=time.time()):
            return
        if self._by_node is not None:
            for s in slots:
                self._by_node[s["node"]].add(job_id)
        self.src_sent.discard(job_id)  # this run's senders start once its receivers have
        self.sent_at[job_id] = time.monotonic()
        self.node_progress.pop(job_id, None)
        self.ended_at.pop(job_id, None)
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
        for i in self.matching(job, node, role, rank):
            s = job["slots"][i]
            if s["started"]:
                continue
            if job["state"] == JobState.DISPATCHING.value and s["role"] != "dst":
                # written behind (HeldStarts): the node's JobStarted is acknowledged once it is
                held = self.held.hold(job_id, started=stamp(at, job.get("dispatched")),
                                      **{f"slots.{i}.started": True})
                s["started"], job["started"] = True, held["started"]
            elif job_id in self.held:
                self.held.hold(job_id, **{f"slots.{i}.started": True})
                s["started"] = True
            elif not self._write(job, {f"slots.{i}.started": True}):
                return
        if job["kind"] == "sync" and job_id not in self.stopping:
            dst = [s for s in job["slots"] if s["role"] == "dst"]
            if all(s["started"] for s in dst) and job_id not in self.src_sent:
                self.src_sent.add(job_id)
                self.sent_at[job_id] = time.monotonic()
                for s in job["slots"]:
                    if s["role"] == "src" and not s["ended"]:
                        out.run.append((s["node"], job_id, node_spec(job, s, addrs, self.transfer_secret)))

    def ended(self, job_id: int, node: str, run: int, state: JobState, exit_code: int, reason: str,
              out: Outcome, role: str = "", rank: int = 0, at: float = 0.0) -> None:
        """One share of a job is over (``at``: when, by its node's clock); finish the job when every share is."""
        job = self.jobs.get(job_id)
        if job is None or job.get("runs") != run or not JobState(job["state"]).active:
            return
        if at:
            self.ended_at[job_id] = max(at, self.ended_at.get(job_id, 0.0))
        mine = [i for i in self.matching(job, node, role, rank) if not job["slots"][i]["ended"]]
        mine.sort(key=lambda i: job["slots"][i]["role"] == "dst")  # (older nodes) a node's sender before its receiver
        if (mine and job["kind"] == "sync" and exit_code == TRANSIENT_EXIT and not job.get("cancel_requested")
                and job_id not in self.stopping and job.get("restarts", 0) < SYNC_RESTARTS):
            self._restart_sync(job, f"{node}: {reason or 'lost its receiver'}", out, None,
                               keep=lambda i, s: i == mine[0])
            return
        self._end_slots(job, mine[:1], state, exit_code, reason, out, by_node=True)

    def wants(self, node: str, job_id: int, run: int | None, role: str = "", rank: int = 0) -> bool:
        """Whether run `run` of the job still has a share (of that role and rank) on node that has not ended."""
        job = self.jobs.get(job_id)
        return (job is not None and JobState(job["state"]).active and job.get("runs") == run
                and any(not job["slots"][i]["ended"] for i in self.matching(job, node, role, rank)))

    def resend(self, addrs: dict[str, str], out: Outcome) -> None:
        """After a (re)load: RunJob again for every share of an active job not yet over (senders only once
        receivers started), or KillJob for the shares of a job that was being stopped."""
        now = time.monotonic()
        for job in self.jobs.values():
            if not JobState(job["state"]).active:
                continue
            forced = {s["state"] for s in job["slots"] if s["ended"]} & {
                JobState.TIMEOUT.value, JobState.NODE_FAIL.value, JobState.CANCELLED.value}
            if job.get("cancel_requested") or forced:
                state = JobState.CANCELLED.value if job.get("cancel_requested") else sorted(forced)[0]
                self.stopping.setdefault(job["_id"], (now + self.stop_timeout, state))
                for s in job["slots"]:
                    if not s["ended"] and s["role"] != "dst":
                        out.kill.append(stop_slot(job, s, state))
                continue
            receivers_ready = all(s["started"] for s in job["slots"] if s["role"] == "dst")
            self.sent_at[job["_id"]] = now
            for s in job["slots"]:
                if s["ended"] or (s["role"] == "src" and not receivers_ready):
                    continue
                if s["role"] == "src":
                    self.src_sent.add(job["_id"])
                out.run.append((s["node"], job["_id"], node_spec(job, s, addrs, self.transfer_secret)))

    # --- ending and stopping: every path computes its writes on a preview, writes, then changes memory ---

    def _end_slots(self, job: Job, indices: list[int], state: JobState, exit_code: int, reason: str,
                   out: Outcome, fields: dict[str, Any] | None = None, by_node: bool = False) -> None:
        """End these slots (``by_node``: their node said they ended, and when); the job too if they were its last."""
        if not indices:
            return
        fields = dict(fields or {})
        for i in indices:
            fields.update({f"slots.{i}.ended": True, f"slots.{i}.started": True, f"slots.{i}.state": state.value,
                           f"slots.{i}.exit_code": exit_code})
        if reason and not job.get("reason") and "reason" not in fields:
            fields["reason"] = reason
        lost_receiver = any(job["slots"][i]["role"] == "dst" for i in indices)
        if lost_receiver and state == JobState.COMPLETED:
            state = JobState.FAILED
        mine = Outcome()
        if state in FORCED or lost_receiver:
            # one share stopped by force, or a receiver is gone: the rest of the job goes too
            self._stop_rest(job, state, fields, mine)
        self._commit(job, fields, mine, out, stopping=state, by_node=by_node)

    def _commit(self, job: Job, fields: dict[str, Any], mine: Outcome, out: Outcome,
                stopping: JobState | None, by_node: bool = False) -> bool:
        """Write fields: the job ends if no share but receivers is left. Only if the write won, the stops
        in ``mine`` go out (and the job waits for them, if ``stopping``). False if it lost."""
        if all(s["ended"] for s in preview(job, fields)["slots"] if s["role"] != "dst"):
            return self._finish(job, mine, out, fields, by_node)
        if not self._write(job, fields):
            return False
        if stopping is not None and mine.kill:
            self.stopping.setdefault(job["_id"], (time.monotonic() + self.stop_timeout, stopping.value))
        out.extend(mine)
        return True

    def _stop_rest(self, job: Job, state: JobState, fields: dict[str, Any], out: Outcome) -> None:
        """Tell every share still going to stop (kills into ``out``, ends into ``fields``).

        A share on a node that is DOWN, or a sender never told to start, has nothing to stop: it ends now.
        """
        view = preview(job, fields)
        for i, s in enumerate(view["slots"]):
            if s["ended"] or s["role"] == "dst":
                continue
            never_sent = s["role"] == "src" and job["_id"] not in self.src_sent
            if never_sent or not self.node_alive(s["node"]):
                code = s["exit_code"] if never_sent else -1
                fields.update({f"slots.{i}.ended": True, f"slots.{i}.state": state.value,
                               f"slots.{i}.exit_code": code})
            else:
                out.kill.append(stop_slot(job, s, state))

    def _finish(self, job: Job, mine: Outcome, out: Outcome, fields: dict[str, Any], by_node: bool = False) -> bool:
        """The job's last share (but receivers) is over: release the receivers, move it to its final state.
        It ended when its nodes say its last share did (``by_node``), else now (the head ended it)."""
        view = preview(job, fields)
        final, exit_code = final_state(view)
        for i, s in enumerate(view["slots"]):
            if s["role"] == "dst" and not s["ended"]:
                if self.node_alive(s["node"]):
                    mine.kill.append(stop_slot(job, s, final))  # releases the receiver
                fields[f"slots.{i}.ended"] = True
        if job.get("progress"):
            fields["progress"] = {**job["progress"], "rate": 0}
        ended = stamp(self.ended_at.get(job["_id"], 0.0) if by_node else 0.0, job.get("started"))
        if not self._move(job, final, ended=ended, exit_code=exit_code, **fields):
            return False
        out.extend(mine)
        out.finished.append(job["_id"])
        return True

    def cancel(self, job_id: int, out: Outcome) -> str:
        """Cancel a job; return what happened, in words ("cancelled", "cancelling", or that it had ended).

        A running job's shares are told to stop; it is CANCELLED once they are gone, or after stop_timeout
        at the latest (expire_stops). Shares on DOWN nodes end at once. A write that loses a race reloads
        the job, and the cancel is tried once more on what was stored.
        """
        for attempt in range(2):
            job = self.jobs.get(job_id)
            if job is None:
                if attempt:
                    break  # the stored job is final: someone else ended it
                raise KeyError(job_id)
            state = JobState(job["state"])
            if state in (JobState.PENDING, JobState.HELD):
                if self._move(job, JobState.CANCELLED, ended=time.time(), exit_code=0):
                    out.finished.append(job_id)
                    return "cancelled"
                continue
            fields: dict[str, Any] = {} if job.get("cancel_requested") else {"cancel_requested": True}
            mine = Outcome()
            self._stop_rest(job, JobState.CANCELLED, fields, mine)
            if self._commit(job, fields, mine, out, stopping=JobState.CANCELLED):
                return "cancelled" if job_id not in self.jobs else "cancelling"
        fresh = self.store.get_job(job_id)
        return f"not cancelled: it is {fresh['state'] if fresh else 'gone'}"

    def expire_stops(self, now: float, out: Outcome) -> None:
        """Shares told to stop that no node confirmed within stop_timeout: release them, drain their nodes."""
        for job_id, (deadline, state) in list(self.stopping.items()):
            job = self.jobs.get(job_id)
            if job is None or not JobState(job["state"]).active:
                self.stopping.pop(job_id, None)
                continue
            if now < deadline:
                continue
            late = [i for i, s in enumerate(job["slots"]) if not s["ended"] and s["role"] != "dst"]
            self.stopping.pop(job_id, None)
            if not late:
                self._finish(job, Outcome(), out, {})
                continue
            for i in late:
                node = job["slots"][i]["node"]
                if self.node_alive(node):
                    out.drain.append((node, "kill not confirmed"))
                event(log, "stop not confirmed; slot released", logging.WARNING, job=job_id, node=node)
            nodes = ",".join(sorted({job["slots"][i]["node"] for i in late}))
            reason = f"kill not confirmed by {nodes}" + (f"; {job['reason']}" if job.get("reason") else "")
            self._end_slots(job, late, JobState(state), -1, "", out, {"reason": reason})

    def overdue(self, now_wall: float, margin: float, out: Outcome) -> None:
        """Jobs past their time limit plus margin that no node ended: the head stops them (TIMEOUT) itself."""
        # one cheap pass (the head calls this every tick, with maybe 10,000 jobs waiting), then the checks
        due = [job for job in self.jobs.values()
               if (start := job.get("started") or job.get("dispatched")) and now_wall > start + job["time_limit"] + margin]
        for job in due:
            if not JobState(job["state"]).active or job["_id"] in self.stopping:
                continue
            fields: dict[str, Any] = {}
            if not job.get("reason"):
                fields["reason"] = "time limit reached; stopped by the head"
            mine = Outcome()
            self._stop_rest(job, JobState.TIMEOUT, fields, mine)
            self._commit(job, fields, mine, out, stopping=JobState.TIMEOUT)

    def check_node(self, node: str, running: set[ShareKey], ending: set[ShareKey], legacy_jobs: set[int] | None,
                   out: Outcome, alive: Callable[[], dict[str, int]]) -> None:
        """Compare what a node says it runs with the slots it was given.

        A started slot the node neither runs nor has just ended was lost there (never started, refused
        silently, forgotten): the job restarts (sync), requeues (--requeue) or ends NODE_FAIL, with the
        reason. `legacy_jobs`: job ids from a node that does not name its shares. `alive()` (usable nodes
        per partition) is asked only when a slot is lost: this runs on every heartbeat of every node.
        """
        known = running | ending
        now = time.monotonic()
        for job in self.on_node(node):
            if not JobState(job["state"]).active or job["_id"] in self.stopping:
                continue
            lost, silent = [], []
            for i, s in enumerate(job["slots"]):
                if s["node"] != node or s["ended"]:
                    continue
                if not s["started"]:
                    sent = s["role"] != "src" or job["_id"] in self.src_sent
                    if sent and now - self.sent_at.get(job["_id"], now) > self.start_timeout:
                        silent.append(i)
                    continue
                here = job["_id"] in legacy_jobs if legacy_jobs is not None else slot_key(job, s) in known
                if not here:
                    lost.append(i)
            if lost or silent:
                s = job["slots"][(lost or silent)[0]]
                what = "is not running" if lost else f"did not start within {self.start_timeout:.0f} s"
                self.share_lost(job, lost + silent, f"{node} {what} its share of the job ({s['role']} "
                                                    f"{s['rank']}, run {job.get('runs', 0)})", out, alive())

    def share_lost(self, job: Job, indices: list[int], reason: str, out: Outcome, alive: dict[str, int]) -> None:
        event(log, "share lost", logging.WARNING, job=job["_id"], reason=reason)
        if job["kind"] == "sync" and not job.get("cancel_requested") and job.get("restarts", 0) < SYNC_RESTARTS:
            self._restart_sync(job, reason, out, alive, keep=lambda i, s: i in indices)
        elif job.get("requeue") and job["kind"] == "command" and not job.get("cancel_requested"):
            self._requeue(job, reason, out, keep=lambda i, s: i in indices)
        else:
            self._end_slots(job, indices, JobState.NODE_FAIL, -1, reason, out)

    def node_lost(self, node: str, reason: str, out: Outcome, alive: dict[str, int]) -> None:
        """A node is DOWN or its daemon restarted: its shares of jobs are gone.

        `alive` counts the usable nodes of each partition: a sync job starts
        again on as many as remain (what was verified is not sent again).
        """
        on_node = lambda i, s: s["node"] == node  # noqa: E731
        for job in self.on_node(node):
            if job["kind"] == "sync" and not job.get("cancel_requested") and job["_id"] not in self.stopping:
                self._restart_sync(job, reason, out, alive, keep=on_node)
                continue
            if (job.get("requeue") and not job.get("cancel_requested") and job["kind"] == "command"
                    and job["_id"] not in self.stopping):
                self._requeue(job, reason, out, keep=on_node)
                continue
            lost = [i for i, s in enumerate(job["slots"]) if s["node"] == node and not s["ended"]]
            self._end_slots(job, lost, JobState.NODE_FAIL, -1, reason, out)

    def _stop_others(self, job: Job, keep: Callable[[int, SlotRecord], bool]) -> list[Stop]:
        """Stops for this run's shares except those `keep` names (already gone), on nodes that are alive."""
        return [stop_slot(job, s, JobState.NODE_FAIL) for i, s in enumerate(job["slots"])
                if not s["ended"] and not keep(i, s) and self.node_alive(s["node"])]

    def _requeue(self, job: Job, reason: str, out: Outcome, keep: Callable[[int, SlotRecord], bool]) -> None:
        stops = self._stop_others(job, keep)
        if self._move(job, JobState.PENDING, slots=[], reason=f"requeued: {reason}", started=None):
            out.kill += stops

    def _restart_sync(self, job: Job, reason: str, out: Outcome, alive: dict[str, int] | None,
                      keep: Callable[[int, SlotRecord], bool]) -> None:
        """Stop this run's other parts and queue the sync again, on as many nodes as remain alive."""
        stops = self._stop_others(job, keep)
        nodes = job["nodes"]
        if alive is not None:
            sync = job["sync"]
            nodes = min([nodes] + [alive.get(sync[side]["partition"], 0)  # type: ignore[literal-required]
                                   for side in ("src", "dst") if sync[side].get("partition")])  # type: ignore[literal-required]
        if self._move(job, JobState.PENDING, slots=[], nodes=max(1, nodes), started=None,
                      restarts=job.get("restarts", 0) + 1, reason=f"restarting: {reason}"):
            out.kill += stops

    def set_reasons(self, reasons: dict[int, str], blocked: Callable[[Job], bool]) -> None:
        """Why each pending job waits, after a scheduler pass (memory only: it changes with every pass)."""
        for job_id in self.requests:
            job = self.jobs[job_id]
            self.reasons[job_id] = "Blocked" if blocked(job) else reasons.get(job_id, "None")

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
        if job_id in self.requests:
            self.requests[job_id] = request_of(job)
        return True

    def progress(self, job_id: int, node: str, run: int, report: dict[str, Any]) -> None:
        """A sender rank's progress (cm.head.progress.report_of), merged into the job's (memory only)."""
        job = self.jobs.get(job_id)
        if job is None or job.get("runs") != run:
            return
        per_node = self.node_progress.setdefault(job_id, {})
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
