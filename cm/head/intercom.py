"""The head's end of the intercom: a job's keys, its fences and the routing of its commands.

Nodes forward what a job's processes ask (cm.node.intercom); everything here is scoped to one
run of one job, and a node may speak only for ranks of the runs it holds. Keys are written to
MongoDB (by a writer thread, in order, so the loop never waits for the database) before a put is
acknowledged, so they outlive a head restart, and are deleted once the run is over (the job ended
or was requeued). A put goes to every node of the job as an IntercomUpdate at once (the node of
the putter sends an unacknowledged put again after a reconnect, so a new head writes it): it
answers the gets waiting there and feeds subscribers. A command goes to the
nodes of the ranks it selected, which queue it (bounded) and say how many took it; the sender
learns that count.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from cm import store
from cm.config import Settings
from cm.logs import event
from cm.head.records import Job
from cm.head.requests import Refused
from cm.intercom import oversize
from cm.protocol import (
    ErrorCode,
    IntercomAnswer,
    IntercomDeliver,
    IntercomDelivered,
    IntercomFence,
    IntercomFenceDone,
    IntercomGet,
    IntercomPut,
    IntercomSend,
    IntercomUpdate,
    Message,
)
from cm.states import JobState

log = logging.getLogger("cm.head.intercom")
DELIVERY_WAIT = 3.0  # seconds the head waits for nodes to say they queued a command
OPEN_FENCES = 4  # fences of one run in progress at once (a rank is never more than one ahead)
RunKey = tuple[int, int]  # (job, run)


@dataclass(eq=False)
class Delivery:
    """A command on its way: which nodes have yet to say how it went."""

    node: str  # the sender's node, which waits for the count
    ref: str
    to: str
    deadline: float
    waiting: dict[str, str] = field(default_factory=dict)  # IntercomDeliver id -> its node, until it answers
    count: int = 0
    refused: list[int] = field(default_factory=list)


class KeyWriter:
    """Writes keys to MongoDB on a thread of its own, in order and in batches, so the head's loop
    never waits for the database. What was written (or failed) comes back through ``finished``;
    ``wakeup_fd`` becomes readable when there is some."""

    BATCH = 500

    def __init__(self) -> None:
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.done: collections.deque = collections.deque()  # (tickets, error or "")
        self.wakeup_fd, self._wake = os.pipe()
        os.set_blocking(self.wakeup_fd, False)
        os.set_blocking(self._wake, False)
        self.thread = threading.Thread(target=self._run, name="cm-intercom-writer", daemon=True)
        self.thread.start()

    def write(self, change: tuple, ticket=None) -> None:
        """Queue a change (see cm.store.intercom.apply); ``ticket`` comes back once it is written."""
        self.todo.put((change, ticket))

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self.todo.get()]
            while len(batch) < self.BATCH and not self.todo.empty():
                batch.append(self.todo.get_nowait())
            stop = None in batch
            batch = [item for item in batch if item is not None]
            try:
                store.intercom.apply([change for change, _ in batch])
                error = ""
            except Exception as exc:  # any database failure: the putters hear of it
                error = str(exc)[:300] or exc.__class__.__name__
            self.done.append(([t for _, t in batch if t is not None], error))
            try:
                os.write(self._wake, b"x")
            except BlockingIOError:
                pass  # a wake-up is pending already

    def finished(self) -> list[tuple[object, str]]:
        """(ticket, error: "" when written) of every change written since the last call."""
        try:
            os.read(self.wakeup_fd, 4096)
        except BlockingIOError:
            pass
        out = []
        while self.done:
            tickets, error = self.done.popleft()
            out += [(t, error) for t in tickets]
        return out

    def close(self) -> None:
        self.todo.put(None)
        self.thread.join(timeout=10)
        os.close(self.wakeup_fd)
        os.close(self._wake)


class HeadIntercom:
    def __init__(self, settings: Settings, table, send: Callable[[str, Message], None]):
        self.settings = settings
        self.table = table  # the head's JobTable
        self.send = send
        self.keys: dict[RunKey, dict[str, tuple[str, int]]] = {}
        self.fences: dict[RunKey, dict[int, set[int]]] = {}  # open fences: epoch -> ranks arrived
        self.fence_done: dict[RunKey, int] = {}
        self.deliveries: dict[str, Delivery] = {}  # IntercomDeliver id -> its delivery
        self.writer: KeyWriter | None = None

    def open(self) -> None:
        """At start: drop the keys of jobs that ended while no head ran."""
        store.intercom.ensure_indexes()
        for job_id in store.intercom.jobs_with_keys():
            job = self.jobs.get(job_id)
            if job is None or job.get("kind") != "command":
                self._drop(job_id)  # at once: the key writer starts below
            else:
                self._keys_of(job_id, job.get("runs", 0))  # watched from now on: deleted when it ends
        self.writer = KeyWriter()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @property
    def wakeup_fd(self) -> int | None:
        """Readable when keys were written: then call ``written``."""
        return self.writer.wakeup_fd if self.writer is not None else None

    def written(self) -> None:
        """Answer the putters whose keys are now in the database."""
        assert self.writer is not None
        for (node, ref, version), error in self.writer.finished():
            if error:
                event(log, "intercom: database error", logging.WARNING, error=error)
                self.send(node, IntercomAnswer(ref=ref, code=ErrorCode.DB_UNAVAILABLE,
                                               error="the database refused the key; try again"))
            else:
                self.send(node, IntercomAnswer(ref=ref, version=version))

    @property
    def jobs(self) -> dict[int, Job]:
        """The active jobs (the table reloads them into a new dict after a database outage)."""
        return self.table.jobs

    # --- node messages ----------------------------------------------------------------

    def on_node(self, peer: str, msg: Message) -> None:
        if isinstance(msg, IntercomDelivered):
            return self._delivered(peer, msg)
        try:
            job = self._check(peer, msg)
            if isinstance(msg, IntercomPut):
                self._put(job, msg)
            elif isinstance(msg, IntercomGet):
                self._get(peer, msg)
            elif isinstance(msg, IntercomFence):
                self._fence(peer, job, msg)
            elif isinstance(msg, IntercomSend):
                self._send(peer, job, msg)
        except Refused as exc:
            self.send(peer, IntercomAnswer(ref=msg.id, code=exc.code, error=str(exc)))
        except (store.StoreError, store.DatabaseError) as exc:
            event(log, "intercom: database error", logging.WARNING, error=str(exc)[:300])
            self.send(peer, IntercomAnswer(ref=msg.id, code=ErrorCode.DB_UNAVAILABLE,
                                           error="the database is unreachable; try again"))
        except Exception:  # a bug here must not take the head down
            log.exception("intercom request failed")
            self.send(peer, IntercomAnswer(ref=msg.id, code=ErrorCode.INTERNAL,
                                           error="internal error in the head; see its log"))

    def _check(self, peer: str, msg: IntercomPut | IntercomGet | IntercomFence | IntercomSend) -> Job:
        """The job, if ``peer`` holds rank ``msg.rank`` of run ``msg.run`` of it; else Refused."""
        job = self.jobs.get(msg.job_id)
        if job is None or job.get("kind") != "command" or job["state"] not in (JobState.RUNNING.value,
                                                                               JobState.DISPATCHING.value):
            raise Refused(f"job {msg.job_id} is not running", ErrorCode.ENDED)
        if job.get("runs") != msg.run:
            raise Refused(f"run {msg.run} of job {msg.job_id} is over", ErrorCode.ENDED)
        procs = job.get("procs", 1)
        slot = job["slots"][msg.rank // procs] if msg.rank < len(job["slots"]) * procs else None
        if slot is None or slot["node"] != peer:
            raise Refused(f"{peer} does not hold rank {msg.rank} of job {msg.job_id}", ErrorCode.FORBIDDEN)
        return job

    # --- keys ---------------------------------------------------------------------------

    def _keys_of(self, job_id: int, run: int) -> dict[str, tuple[str, int]]:
        kv = self.keys.get((job_id, run))
        if kv is None:
            self._drop(job_id, keep_run=run)  # an earlier run's keys are not this run's
            kv = self.keys[(job_id, run)] = store.intercom.load_keys(job_id, run)
        return kv

    def _put(self, job: Job, msg: IntercomPut) -> None:
        s = self.settings
        _limit("key", msg.key, s.intercom_key_bytes)
        _limit("value", msg.value, s.intercom_value_bytes)
        kv = self._keys_of(msg.job_id, msg.run)
        if msg.key not in kv and len(kv) >= s.intercom_keys:
            raise Refused(f"job {msg.job_id} holds {len(kv)} keys, the limit (CM_INTERCOM_KEYS)", ErrorCode.LIMIT)
        version = kv.get(msg.key, ("", 0))[1] + 1
        kv[msg.key] = (msg.value, version)
        # readers hear of it at once; the putter is answered once the writer has it in the database, and until
        # then its node sends the put again after any reconnect (so a new head writes it)
        update = IntercomUpdate(job_id=msg.job_id, run=msg.run, key=msg.key, value=msg.value, version=version)
        for node in _nodes(job):
            self.send(node, update)
        self._write(("save", msg.job_id, msg.run, msg.key, msg.value, version), (msg.node, msg.id, version))

    def _write(self, change: tuple, ticket=None) -> None:
        if self.writer is not None:
            self.writer.write(change, ticket)
        else:  # not opened (a head in a test): at once
            store.intercom.apply([change])
            if ticket is not None:
                self.send(ticket[0], IntercomAnswer(ref=ticket[1], version=ticket[2]))

    def _drop(self, job_id: int, keep_run: int | None = None) -> None:
        self._write(("drop", job_id, keep_run))

    def _get(self, peer: str, msg: IntercomGet) -> None:
        _limit("key", msg.key, self.settings.intercom_key_bytes)
        found = self._keys_of(msg.job_id, msg.run).get(msg.key)
        if found is None:
            self.send(peer, IntercomAnswer(ref=msg.id, absent=True))  # the node waits for its IntercomUpdate
        else:
            self.send(peer, IntercomAnswer(ref=msg.id, value=found[0], version=found[1]))

    # --- fences -------------------------------------------------------------------------

    def _fence(self, peer: str, job: Job, msg: IntercomFence) -> None:
        run = (msg.job_id, msg.run)
        done = self.fence_done.get(run, 0)
        if msg.epoch <= done:  # a repeat (the node missed the news): tell it again
            self.send(peer, IntercomFenceDone(job_id=msg.job_id, run=msg.run, epoch=done))
            return
        open_ = self.fences.setdefault(run, {})
        if msg.epoch not in open_ and len(open_) >= OPEN_FENCES:
            raise Refused(f"fence {msg.epoch} of job {msg.job_id}: too many fences in progress")
        arrived = open_.setdefault(msg.epoch, set())
        arrived.add(msg.rank)
        if len(arrived) < len(job["slots"]) * job.get("procs", 1):
            return
        self.fence_done[run] = msg.epoch
        for epoch in [e for e in open_ if e <= msg.epoch]:
            del open_[epoch]
        news = IntercomFenceDone(job_id=msg.job_id, run=msg.run, epoch=msg.epoch)
        for node in _nodes(job):
            self.send(node, news)

    # --- commands -----------------------------------------------------------------------

    def _send(self, peer: str, job: Job, msg: IntercomSend) -> None:
        _limit("command", msg.command, self.settings.intercom_value_bytes)
        procs, total = job.get("procs", 1), len(job["slots"]) * job.get("procs", 1)
        ranks = sorted({r for r in msg.ranks if r < total and (r != msg.rank or msg.reply)})
        if not ranks:
            raise Refused(f"no process of job {msg.job_id} matches the condition {msg.to!r}")
        by_node: dict[str, list[int]] = {}
        for r in ranks:
            by_node.setdefault(job["slots"][r // procs]["node"], []).append(r)
        delivery = Delivery(peer, msg.id, msg.to, time.monotonic() + DELIVERY_WAIT)
        for node, node_ranks in by_node.items():
            out = IntercomDeliver(job_id=msg.job_id, run=msg.run, ranks=node_ranks, command=msg.command,
                                  sender=f"{peer}/{msg.rank}", reply=msg.reply)
            delivery.waiting[out.id] = node
            self.deliveries[out.id] = delivery
            self.send(node, out)

    def _delivered(self, peer: str, msg: IntercomDelivered) -> None:
        delivery = self.deliveries.get(msg.ref)
        if delivery is None or delivery.waiting.get(msg.ref) != peer:
            return  # late, or not the node it was sent to
        del self.deliveries[msg.ref], delivery.waiting[msg.ref]
        delivery.count += msg.count
        delivery.refused += msg.refused
        if not delivery.waiting:
            self._answer_delivery(delivery)

    def _answer_delivery(self, d: Delivery) -> None:
        if d.count == 0:
            why = (f"ranks {sorted(d.refused)[:20]} did not take it (their queue is full, CM_INTERCOM_QUEUE, or "
                   f"they ended)" if d.refused else "no node answered in time")
            self.send(d.node, IntercomAnswer(ref=d.ref, code=ErrorCode.LIMIT if d.refused else ErrorCode.REFUSED,
                                             error=f"the command to {d.to!r} reached nobody: {why}"))
        else:
            self.send(d.node, IntercomAnswer(ref=d.ref, count=d.count))

    # --- timers -------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Answer deliveries nodes did not confirm in time; forget (and delete) runs that are over."""
        late = {d for d in self.deliveries.values() if now >= d.deadline}
        for d in late:
            for ref in d.waiting:
                self.deliveries.pop(ref, None)
            d.waiting.clear()
            self._answer_delivery(d)
        for run in {*self.keys, *self.fences}:
            job = self.jobs.get(run[0])
            if job is not None and job.get("runs") == run[1] and job["state"] not in _OVER:
                continue
            self._drop(run[0], keep_run=job.get("runs") if job is not None else None)
            self.keys.pop(run, None)
            self.fences.pop(run, None)
            self.fence_done.pop(run, None)


_OVER = {s.value for s in JobState if s.final}


def _nodes(job: Job) -> list[str]:
    return sorted({s["node"] for s in job["slots"]})


def _limit(name: str, text: str, limit: int) -> None:
    """Refuse text over its size setting (an empty key or a negative rank does not decode)."""
    problem = oversize(name, text, limit)
    if problem:
        raise Refused(problem, ErrorCode.LIMIT)
