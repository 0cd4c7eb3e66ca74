"""The head as a state machine: ``HeadState.handle(event) -> list[Instruction]`` (cm.head.events).

No socket and no clock in here: time comes in the events, the stores are injected (the job table's
``JobStore``; ``db`` for nodes and the admin policy: cm.store, or ones in memory in the unit tests).
The database's outage is a mode: while it lasts, the head answers what needs no database and keeps
the rest for later (``DOWN``); the nodes send again what was not acknowledged.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from cm import store
from cm.config import Settings
from cm.head.answers import Answers
from cm.callers import Caller
from cm.head.events import (Answer, ClientAsked, Command, DbBack, DbLost, Delivered, Event, Flush, Forget,
                            Instruction, Intercom, NodeSaid, Notify, NotifyFailed, Park, Pass, Resend, Send, Tick)
from cm.head.jobs import JobTable
from cm.head.outcome import Outcome, Stop
from cm.head.progress import report_of
from cm.head.records import Job
from cm.head.registry import Registry
from cm.head.requests import Later, handle as handle_request
from cm.head.resources import NodeView
from cm.head.scheduler import Scheduler
from cm.logs import event
from cm.protocol import (INTERCOM_TO_HEAD, Ack, Error, ErrorCode, Heartbeat, Hello, JobEnded, JobStarted, KillJob,
                         Message, Progress, Reply, Request, RunJob, ShareKey, Welcome)
from cm.states import JobState

log = logging.getLogger("cm.head")
DB_ERRORS = (store.StoreError, store.DatabaseUnreachable, store.DatabaseError)


def unavailable() -> Reply:
    return Reply(ok=False, error="the database is unreachable; the head is waiting for it, try again shortly",
                 code=ErrorCode.DB_UNAVAILABLE)


class HeadState(Answers):
    def __init__(self, settings: Settings, jobs: JobTable, registry: Registry, scheduler: Scheduler, db: Any = store,
                 perf: Callable[[], float] = time.perf_counter) -> None:
        self.settings, self.jobs, self.registry, self.scheduler, self.db = settings, jobs, registry, scheduler, db
        self.perf = perf  # only to measure a scheduler pass, which spaces the next one by its cost
        self.jobs.node_alive = self._alive
        self.jobs.addrs = self.addrs
        self.up = True  # the mode: the database answers (False: memory may differ from it, reload when back)
        self.dirty = True  # something changed that a scheduler pass may act on
        self.admin_policy: dict[str, Any] = {}
        self.held_acks: list[tuple[str, int, Ack]] = []  # (node, job, ack) sent once the job's start is written
        self.pass_seconds = 0.0  # how long the last scheduler pass took
        self.next_pass = 0.0  # passes are spaced by their own cost so they never take over the head
        self.passes = 0
        self.moved = {"bytes": 0, "files": 0, "syncs": 0}  # what finished sync jobs moved since the head started
        self.waiters = 0  # long polls the loop holds (for metrics)
        self.sort_key = lambda name: NodeView(name, "", 0, 0).sort_key
        self.out: list[Instruction] = []
        self.modes: dict[bool, dict[type, Callable[[Any], None]]] = {
            True: {NodeSaid: self._node_said, ClientAsked: self._client_asked, Tick: self._tick, Flush: self._flush,
                   Pass: self._pass, DbLost: self._db_lost, DbBack: lambda ev: None,
                   NotifyFailed: self._notify_failed},
            False: {NodeSaid: self._node_said_down, ClientAsked: self._client_asked_down, Tick: lambda ev: None,
                    Flush: lambda ev: None, Pass: lambda ev: None, DbLost: lambda ev: None, DbBack: self._db_back,
                    NotifyFailed: self._notify_failed},
        }

    def open(self, now: float, wall: float) -> list[Instruction]:
        """Load from the stores and send again what unfinished jobs wait for."""
        self.jobs.clock.set(now, wall)
        self.registry.started = now  # every node gets a full heartbeat timeout to call back
        self.registry.load()
        self.jobs.load()
        self.admin_policy = self.db.get_policy()  # only this head changes it
        self._resend_unfinished()
        return self._take()

    def handle(self, ev: Event) -> list[Instruction]:
        self.jobs.clock.set(ev.mono, ev.wall)
        try:
            self.modes[self.up][type(ev)](ev)
        except DB_ERRORS as exc:
            self._failed(f"handling {type(ev).__name__}", exc)
        return self._take()

    def _take(self) -> list[Instruction]:
        out, self.out = self.out, []
        return out

    # --- what the loop asks -----------------------------------------------------------------------

    def pass_due(self, now: float) -> float | None:
        """When a scheduler pass is due (monotonic), or None if nothing changed."""
        return self.next_pass if self.dirty and self.up else None

    def still_wanted(self, node: str, msg: Message) -> bool:
        """Whether an unacknowledged command is still worth sending again. A RunJob outlives its purpose when
        the job ended or moved on meanwhile (e.g. the node's daemon restarted and its share was declared lost):
        sent again, a fresh daemon with no memory of the job would start it a second time."""
        if isinstance(msg, RunJob):
            spec = msg.spec
            return not self.jobs.stopping(msg.job_id) and self.jobs.wants(node, msg.job_id, spec.run, spec.role,
                                                                           spec.rank)
        return True

    def final(self, job_id: int) -> bool:
        return job_id not in self.jobs.jobs

    # --- the database's outage --------------------------------------------------------------------

    def _failed(self, where: str, exc: Exception) -> None:
        """A write failed part-way: memory may now differ from the database, so it is reloaded before use."""
        if self.up:
            event(log, "database unreachable; waiting for it", logging.ERROR, where=where, error=str(exc)[:300])
        self.up = False
        self.held_acks.clear()  # not written: the nodes report again

    def _db_lost(self, ev: DbLost) -> None:
        self._failed(ev.where, store.StoreError(ev.error))

    def _db_back(self, ev: DbBack) -> None:
        try:
            self.jobs.load()
        except DB_ERRORS:
            return
        self.up, self.dirty = True, True
        self._resend_unfinished()
        event(log, "database back; jobs reloaded", active=len(self.jobs.jobs))

    def _node_said_down(self, ev: NodeSaid) -> None:
        if isinstance(ev.msg, (Hello, JobStarted, JobEnded)):
            return  # needs the database; the node sends it again until acknowledged
        if isinstance(ev.msg, Heartbeat):
            self._seen(ev.peer, ev.msg, ev.mono)
            return
        self._node_said(ev)

    def _client_asked_down(self, ev: ClientAsked) -> None:
        if ev.request.op == "ping":
            self._client_asked(ev)
        else:
            self.out.append(Answer(ev.to, unavailable()))

    # --- client requests --------------------------------------------------------------------------

    def _client_asked(self, ev: ClientAsked) -> None:
        reply = self.answer(ev.caller, ev.request, ev.to)
        if reply is not None:
            self.out.append(Answer(ev.to, reply))

    def answer(self, caller: Caller, request: Request, to: Any = None) -> Reply | None:
        """The reply to a request (None: a long poll, parked); never raises but for the database's outage."""
        try:
            return handle_request(self, caller, request)
        except Later as later:
            self.out.append(Park(later.job_id, caller, to, request, later.deadline))
            return None
        except (store.StoreError, store.DatabaseUnreachable) as exc:
            self._failed(f"request {request.op}", exc)
            return unavailable()
        except store.DatabaseError as exc:
            return Reply(ok=False, error=f"the database refused the request: {str(exc)[:300]}",
                         code=ErrorCode.REFUSED)
        except Exception:  # a bug in one handler must not take the head down
            log.exception("request failed")
            return Reply(ok=False, error="internal error in the head; see its log", code=ErrorCode.INTERNAL)

    # --- node messages ----------------------------------------------------------------------------

    def _seen(self, peer: str, msg: Message, now: float) -> bool:
        if self.registry.seen(peer, now):
            return True
        self.out.append(Send(peer, Error(ref=msg.id, message="unknown node: say hello", code=ErrorCode.UNKNOWN_NODE)))
        return False

    def _node_said(self, ev: NodeSaid) -> None:
        peer, msg = ev.peer, ev.msg
        node = getattr(msg, "node", peer)
        if node != peer:
            self.out.append(Send(peer, Error(ref=msg.id, message=f"node field {node!r} does not match routing id",
                                             code=ErrorCode.BAD_MESSAGE)))
            return
        out = Outcome()
        if isinstance(msg, Hello):
            self._hello(msg, ev.mono, out)
        elif isinstance(msg, Heartbeat):
            if self._seen(peer, msg, ev.mono):
                self.reconcile(peer, msg.running, msg.shares, msg.ending, out)
        elif not self._seen(peer, msg, ev.mono):
            return
        elif isinstance(msg, JobStarted):
            self.out.append(Forget(peer, msg.share))
            begins = (self.jobs.jobs.get(msg.job_id) or {}).get("started") is None  # this run's first share
            self.jobs.started(msg.job_id, peer, msg.run, self.addrs(), out, msg.role, msg.rank, msg.at)
            if begins and (self.jobs.jobs.get(msg.job_id) or {}).get("started") is not None:
                self.out.append(Notify("begin", self.jobs.jobs[msg.job_id]))
            self.held_acks.append((peer, msg.job_id, Ack(ref=msg.id)))  # acknowledged once written: _flush
        elif isinstance(msg, JobEnded):
            try:
                state = JobState(msg.state)
            except ValueError:
                self.out.append(Send(peer, Error(ref=msg.id, message=f"unknown state {msg.state!r}",
                                                 code=ErrorCode.BAD_MESSAGE)))
                return
            if not state.final:
                self.out.append(Send(peer, Error(ref=msg.id, message=f"state {msg.state} is not final",
                                                 code=ErrorCode.BAD_MESSAGE)))
                return
            self.out.append(Forget(peer, msg.share))
            self.jobs.ended(msg.job_id, peer, msg.run, state, msg.exit_code, msg.reason, out, msg.role, msg.rank,
                            msg.at)
            self.out.append(Send(peer, Ack(ref=msg.id)))
            self.dirty = True
        elif isinstance(msg, Progress):
            self.jobs.progress(msg.job_id, f"{peer}/{msg.rank}", msg.run, report_of(msg))
            if msg.stats is not None:
                self.out.append(Send(peer, Ack(ref=msg.id)))  # final counters are reported reliably
        elif isinstance(msg, INTERCOM_TO_HEAD):
            self.out.append(Intercom(peer, msg))
        elif isinstance(msg, Ack):
            self.out.append(Delivered(msg.ref))
        elif isinstance(msg, Error):
            event(log, "node reported an error", logging.WARNING, node=peer, ref=msg.ref, error=msg.message,
                  code=msg.code.value)
        else:
            self.out.append(Send(peer, Error(ref=msg.id, message=f"{msg.TYPE} is not a node-to-head message",
                                             code=ErrorCode.BAD_MESSAGE)))
        self.apply(out)

    def _hello(self, msg: Hello, now: float, out: Outcome) -> None:
        _, restarted = self.registry.hello(msg, now)
        if restarted:
            self.jobs.node_lost(msg.node, "node daemon restarted", out, self.alive())
        self.out.append(Send(msg.node, Welcome(heartbeat_interval=self.settings.heartbeat_interval, kill=[])))
        self.reconcile(msg.node, msg.running, msg.shares, msg.ending, out)
        self.out.append(Resend(msg.node))  # whatever it missed while away
        self.dirty = True

    def reconcile(self, node: str, running: list[int], shares: list[ShareKey], ending: list[ShareKey],
                  out: Outcome) -> None:
        """Make the head and a node agree on its slots (on HELLO and on every heartbeat).

        A share the node runs that no active job gives it is stopped; a share it runs that the head
        did not know had started is marked started; a started slot the node neither runs nor has just
        ended is lost (see JobTable.check_node).
        """
        addrs = None
        legacy = set(running) if running and not shares else None  # an older node names jobs, not shares
        for share in shares:
            job = self.jobs.jobs.get(share.job_id)
            if not self.jobs.wants(node, share.job_id, share.run, share.role, share.rank):
                if not self.jobs.stopping(share.job_id):  # those are being stopped already
                    out.kill.append(Stop(node, share.job_id, JobState.CANCELLED.value, share.run, share.role,
                                         share.rank, "the head does not know this share"))
            elif job is not None and not all(job["slots"][i]["started"]
                                             for i in self.jobs.matching(job, node, share.role, share.rank)):
                addrs = addrs if addrs is not None else self.addrs()
                self.jobs.started(share.job_id, node, share.run, addrs, out, share.role, share.rank)
        for job_id in legacy or ():
            job = self.jobs.jobs.get(job_id)
            if job is None or not self.jobs.wants(node, job_id, job.get("runs")):
                out.kill.append(Stop(node, job_id, JobState.CANCELLED.value, reason="the head does not know this job"))
            else:
                self.jobs.started(job_id, node, job["runs"], self.addrs(), out)
        self.jobs.check_node(node, set(shares), set(ending), legacy, out, self.alive)

    def _alive(self, name: str) -> bool:
        info = self.registry.nodes.get(name)
        return info is not None and info.alive

    def alive(self) -> dict[str, int]:
        """Usable nodes per partition."""
        counts: dict[str, int] = {}
        for n in self.registry.nodes.values():
            if n.alive and not n.drain:
                counts[n.partition] = counts.get(n.partition, 0) + 1
        return counts

    def addrs(self) -> dict[str, str]:
        return {n.name: n.transfer_addr for n in self.registry.nodes.values()}

    # --- what a change asks for -------------------------------------------------------------------

    def apply(self, out: Outcome) -> None:
        for node, job_id, spec in out.run:
            self.out.append(Command(node, RunJob(job_id=job_id, spec=spec), now=self._alive(node)))
        for stop in out.kill:
            kill = KillJob(job_id=stop.job_id, state=stop.state, reason=stop.reason, run=stop.run, role=stop.role,
                           rank=stop.rank)
            self.out.append(Forget(stop.node, kill.share))  # never start it now
            self.out.append(Command(stop.node, kill, now=self._alive(stop.node)))
        for node, reason in out.drain:
            if node in self.registry.nodes and not self.registry.nodes[node].drain:
                self.registry.set_drain(node, True, reason)
                event(log, "node drained", logging.WARNING, node=node, reason=reason)
        for job_id in out.finished:
            job = self.jobs.recent.get(job_id)
            if job is not None:
                self.out.append(Notify("end", job))
            if job is not None and job["kind"] == "sync":
                done = job.get("progress") or {}
                self.moved["bytes"] += done.get("bytes_done", 0)
                self.moved["files"] += done.get("files_done", 0)
                self.moved["syncs"] += 1
        if out.finished or out.kill or out.drain:
            self.dirty = True

    def _resend_unfinished(self) -> None:
        """After a (re)load: send again what unfinished jobs were waiting for; nodes ignore repeats."""
        out = Outcome()
        self.jobs.resend(self.addrs(), out)
        self.apply(out)

    # --- timers and scheduling --------------------------------------------------------------------

    def _tick(self, ev: Tick) -> None:
        out = Outcome()
        for node in self.registry.expire(ev.mono):
            self.jobs.node_lost(node.name, f"node {node.name} stopped answering", out, self.alive())
            self.dirty = True
        self.jobs.expire_stops(ev.mono, out)
        self.jobs.overdue(ev.wall, self.settings.kill_grace + self.settings.kill_confirm
                          + self.settings.heartbeat_timeout, out)
        self.apply(out)

    def _notify_failed(self, ev: NotifyFailed) -> None:
        """Show a failed webhook on the job kept in memory (the store has it already: cm.store.notify)."""
        job = self.jobs.jobs.get(ev.job_id) or self.jobs.recent.get(ev.job_id)
        if job is not None:
            job["notify_error"] = ev.failure

    def _flush(self, ev: Flush) -> None:
        """Write the starts held back longer than ``hold`` seconds, then acknowledge what is written."""
        self.jobs.flush(older_than=ev.hold)
        waiting = []
        for peer, job_id, ack in self.held_acks:
            if self.jobs.unsaved(job_id):
                waiting.append((peer, job_id, ack))
            else:
                self.out.append(Send(peer, ack))
        self.held_acks = waiting

    def next_flush(self, hold: float) -> float | None:
        return self.jobs.next_flush(hold) if self.up else None

    def blocked(self, job: Job) -> bool:
        """Whether an administrator's block keeps this job waiting (root's jobs are never blocked)."""
        policy = self.admin_policy
        return job.get("uid") != 0 and bool(policy.get("block_all") or job["user"] in policy.get("blocked_users", ()))

    def _pass(self, ev: Pass) -> None:
        self.dirty = False
        pending = self.jobs.pending()
        if not pending:
            return
        started = self.perf()
        nodes = self.jobs.views(self.registry.nodes.values())
        if self.admin_policy.get("block_all") or self.admin_policy.get("blocked_users"):
            pending = [r for r in pending if not self.blocked(self.jobs.jobs[r.job_id])]
        plan = self.scheduler.plan(pending, nodes, self.jobs.running(), ev.wall)
        self.jobs.set_reasons(self.scheduler.reasons, blocked=self.blocked)
        out = Outcome()
        addrs = self.addrs()
        planned = self.perf()
        for request, assignment in plan:
            self.jobs.dispatch(request.job_id, assignment, addrs, out)
        self.apply(out)
        self.pass_seconds = planned - started
        self.passes += 1
        self.next_pass = ev.mono + (self.perf() - started) + 2 * self.pass_seconds
