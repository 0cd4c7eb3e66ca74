"""How the head's jobs end: cancels, time limits, lost shares and nodes, stops nobody confirmed, restarts.

A part of ``JobTable`` (cm.head.jobs), kept apart to be read in one sitting; the rules it applies (restart
a sync? requeue? which forced end wins?) are cm.head.rules'. Every path computes its writes on a preview,
writes, then changes memory.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from cm.head.outcome import Outcome, Stop, stop_slot
from cm.head.records import Job, SlotRecord
from cm.head.rules import FORCED, final_state, forced_end, may_requeue, may_restart, preview, slot_key, stamp
from cm.head.specs import node_spec
from cm.logs import event
from cm.protocol import ShareKey
from cm.states import JobState
from cm.transfer.exitcodes import TRANSIENT as TRANSIENT_EXIT  # a sender lost its receiver: run the sync again

log = logging.getLogger("cm.head.jobs")

Keep = Callable[[int, SlotRecord], bool]  # the slots a restart or requeue need not stop (already gone)


class Endings:
    """JobTable's ending half: it uses the table's jobs, runtime, store, clock and conditional writes."""

    def ended(self, job_id: int, node: str, run: int, state: JobState, exit_code: int, reason: str,
              out: Outcome, role: str = "", rank: int = 0, at: float = 0.0) -> None:
        """One share of a job is over (``at``: when, by its node's clock); finish the job when every share is."""
        job = self.jobs.get(job_id)
        if job is None or job.get("runs") != run or not JobState(job["state"]).active:
            return
        rt = self.runtime[job_id]
        if at:
            rt.ended_at = max(at, rt.ended_at)
        mine = [i for i in self.matching(job, node, role, rank) if not job["slots"][i]["ended"]]
        mine.sort(key=lambda i: job["slots"][i]["role"] == "dst")  # (older nodes) a node's sender before its receiver
        if mine and exit_code == TRANSIENT_EXIT and may_restart(job, rt.stopping is not None):
            self._restart_sync(job, f"{node}: {reason or 'lost its receiver'}", out, None,
                               keep=lambda i, s: i == mine[0])
            return
        self._end_slots(job, mine[:1], state, exit_code, reason, out, by_node=True)

    def resend(self, addrs: dict[str, str], out: Outcome) -> None:
        """After a (re)load: RunJob again for every share of an active job not yet over (senders only once
        receivers started), or KillJob for the shares of a job that was being stopped."""
        now = self.clock.mono()
        for job in self.jobs.values():
            if not JobState(job["state"]).active:
                continue
            rt = self.runtime[job["_id"]]
            forced = forced_end(job)
            if forced is not None:
                self._stop_by(job["_id"], now + self.stop_timeout, forced.value)
                for s in job["slots"]:
                    if not s["ended"] and s["role"] != "dst":
                        out.kill.append(stop_slot(job, s, forced))
                continue
            receivers_ready = all(s["started"] for s in job["slots"] if s["role"] == "dst")
            rt.sent_at = now
            for s in job["slots"]:
                if s["ended"] or (s["role"] == "src" and not receivers_ready):
                    continue
                if s["role"] == "src":
                    rt.src_sent = True
                out.run.append((s["node"], job["_id"], node_spec(job, s, addrs, self.transfer_secret)))

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
                if self._move(job, JobState.CANCELLED, ended=self.clock.wall(), exit_code=0):
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
        for job_id in list(self._stopping):
            rt, job = self.runtime.get(job_id), self.jobs.get(job_id)
            if rt is None or job is None or rt.stopping is None or not JobState(job["state"]).active:
                self._stopping.pop(job_id, None)
                if rt is not None:
                    rt.stopping = None
                continue
            deadline, state = rt.stopping
            if now < deadline:
                continue
            late = [i for i, s in enumerate(job["slots"]) if not s["ended"] and s["role"] != "dst"]
            rt.stopping = None
            self._stopping.pop(job_id, None)
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
            if not JobState(job["state"]).active or self.stopping(job["_id"]):
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
        reason. A slot sent that did not start within start_timeout of its (latest) sending is lost too;
        a sync's senders not yet told to start once its receivers did are told now. `legacy_jobs`: job
        ids from a node that does not name its shares. `alive()` (usable nodes per partition) is asked
        only when a slot is lost: this runs on every heartbeat of every node.
        """
        known = running | ending
        now = self.clock.mono()
        for job in self.on_node(node):
            rt = self.runtime[job["_id"]]
            if not JobState(job["state"]).active or rt.stopping is not None:
                continue
            lost, silent = [], []
            for i, s in enumerate(job["slots"]):
                if s["node"] != node or s["ended"]:
                    continue
                if not s["started"]:
                    if s["role"] == "src" and not rt.src_sent:
                        if all(d["started"] for d in job["slots"] if d["role"] == "dst"):
                            self._send_senders(job, self.addrs(), out)  # (a reload forgot they were told)
                    elif now - rt.sent_at > self.start_timeout:
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

    def share_lost(self, job: Job, indices: list[int], reason: str, out: Outcome,
                   alive: dict[str, int]) -> None:
        event(log, "share lost", logging.WARNING, job=job["_id"], reason=reason)
        self._lose(job, indices, reason, out, alive, keep=lambda i, s: i in indices)

    def node_lost(self, node: str, reason: str, out: Outcome, alive: dict[str, int]) -> None:
        """A node is DOWN or its daemon restarted: its shares of jobs are gone.

        `alive` counts the usable nodes of each partition: a sync job starts
        again on as many as remain (what was verified is not sent again).
        """
        for job in self.on_node(node):
            lost = [i for i, s in enumerate(job["slots"]) if s["node"] == node and not s["ended"]]
            self._lose(job, lost, reason, out, alive, keep=lambda i, s: s["node"] == node)

    def _lose(self, job: Job, indices: list[int], reason: str, out: Outcome, alive: dict[str, int],
              keep: Keep) -> None:
        """These slots are gone: the sync restarts, the --requeue job waits again, or the job ends NODE_FAIL
        (cm.head.rules)."""
        stopping = self.stopping(job["_id"])
        if may_restart(job, stopping):
            self._restart_sync(job, reason, out, alive, keep=keep)
        elif may_requeue(job, stopping):
            self._requeue(job, reason, out, keep=keep)
        else:
            self._end_slots(job, indices, JobState.NODE_FAIL, -1, reason, out)

    def _stop_others(self, job: Job, keep: Keep) -> list[Stop]:
        """Stops for this run's shares except those `keep` names (already gone), on nodes that are alive."""
        return [stop_slot(job, s, JobState.NODE_FAIL) for i, s in enumerate(job["slots"])
                if not s["ended"] and not keep(i, s) and self.node_alive(s["node"])]

    def _requeue(self, job: Job, reason: str, out: Outcome, keep: Keep) -> None:
        stops = self._stop_others(job, keep)
        if self._move(job, JobState.PENDING, slots=[], reason=f"requeued: {reason}", started=None):
            out.kill += stops

    def _restart_sync(self, job: Job, reason: str, out: Outcome, alive: dict[str, int] | None,
                      keep: Keep) -> None:
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

    # --- ending and stopping ---------------------------------------------------

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
            self._stop_by(job["_id"], self.clock.mono() + self.stop_timeout, stopping.value)
        out.extend(mine)
        return True

    def _stop_rest(self, job: Job, state: JobState, fields: dict[str, Any], out: Outcome) -> None:
        """Tell every share still going to stop (kills into ``out``, ends into ``fields``).

        A share on a node that is DOWN, or a sender never told to start, has nothing to stop: it ends now.
        """
        view = preview(job, fields)
        src_sent = self.runtime[job["_id"]].src_sent
        for i, s in enumerate(view["slots"]):
            if s["ended"] or s["role"] == "dst":
                continue
            never_sent = s["role"] == "src" and not src_sent
            if never_sent or not self.node_alive(s["node"]):
                code = s["exit_code"] if never_sent else -1
                fields.update({f"slots.{i}.ended": True, f"slots.{i}.state": state.value,
                               f"slots.{i}.exit_code": code})
            else:
                out.kill.append(stop_slot(job, s, state))

    def _finish(self, job: Job, mine: Outcome, out: Outcome, fields: dict[str, Any],
                by_node: bool = False) -> bool:
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
        ended_at = self.runtime[job["_id"]].ended_at if by_node else 0.0
        ended = stamp(ended_at, job.get("started"), self.clock.wall())
        if not self._move(job, final, ended=ended, exit_code=exit_code, **fields):
            return False
        out.extend(mine)
        out.finished.append(job["_id"])
        return True
