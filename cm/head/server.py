"""The head daemon's loop: node messages on a ROUTER, clients on a Unix socket.

One thread owns all head state, so nothing here needs a lock. Each turn of
the loop takes what arrived, applies it, schedules if anything changed, and
resends commands nodes have not acknowledged.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import zmq

from cm import store
from cm.config import Settings
from cm.head.clients import Caller, ClientServer, Connection
from cm.head.intercom import HeadIntercom
from cm.head.jobs import JobTable
from cm.head.outcome import Outcome, Stop
from cm.head.progress import report_of
from cm.head.records import Job
from cm.head.policies import get_policy
from cm.head.registry import NodeInfo, Registry
from cm.head.requests import Later, handle
from cm.head.resources import NodeView
from cm.head.scheduler import Scheduler
from cm.keys import TRANSFER_SECRET, secret
from cm.logs import Sometimes, event
from cm.protocol import (
    INTERCOM_TO_HEAD,
    Ack,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    JobEnded,
    JobStarted,
    KillJob,
    Message,
    NodeView as NodeRow,
    OtherVersion,
    Progress,
    ProtocolError,
    Reply,
    Request,
    RunJob,
    Welcome,
    decode,
    encode,
    version_refusal,
)
from cm.states import JobState
from cm.store.jobstore import MongoJobStore

log = logging.getLogger("cm.head")
RUNNING_HOLD = 0.05  # seconds a RUNNING write may wait to be merged with the job's end


class SocketAnswer:
    """Where the reply to a command-socket request goes (a long poll keeps one of these; the HTTP API's
    counterpart is cm.api.server.ApiAnswer)."""

    def __init__(self, clients: ClientServer, conn: Connection, request: Request):
        self.clients, self.conn, self.request = clients, conn, request

    def alive(self) -> bool:
        return self.clients.conns.get(self.conn.fd) is self.conn

    def answer(self, reply: Reply) -> None:
        self.clients.send(self.conn, reply, self.request)


def _unavailable() -> Reply:
    return Reply(ok=False, error="the database is unreachable; the head is waiting for it, try again shortly",
                 code=ErrorCode.DB_UNAVAILABLE)


class HeadServer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = Registry(settings.heartbeat_timeout)
        self.jobs = JobTable(MongoJobStore(), stop_timeout=settings.kill_grace + settings.kill_confirm,
                             transfer_secret=secret(settings.run_dir, TRANSFER_SECRET))
        self.jobs.node_alive = self._alive
        self.scheduler = Scheduler(get_policy(settings.policy), settings.backfill)
        self.dirty = True
        # commands awaiting an ack: msg id -> (node, message, last sent)
        self.unacked: dict[str, tuple[str, Message, float]] = {}
        self.held_acks: list[tuple[str, int, Ack]] = []  # (node, job, ack) sent once the start is written
        self.stale = False  # memory may differ from the database after a failed write
        self.admin_policy: dict = {}
        self.pass_seconds = 0.0  # how long the last scheduler pass took
        self.next_pass = 0.0  # passes are spaced by their own cost so they never take over the head
        self.passes = 0
        self.router: zmq.Socket | None = None
        self.gatekeeper = None  # CurveZMQ key checks, when curve is on
        self.other_versions = Sometimes()  # nodes refused for their version, by name
        self.clients: ClientServer | None = None
        # long polls ("wait"): job id -> [(caller, where the answer goes, request, deadline)], answered when
        # the job is final; the answer goes to a command-socket connection or to the HTTP API (cm.api)
        self.waiters: dict[int, list[tuple[Caller, Any, Request, float]]] = {}
        self.api = None  # cm.api.server.ApiServer: the HTTP API's thread, which hands requests to this loop
        self.moved = {"bytes": 0, "files": 0, "syncs": 0}  # what finished sync jobs moved since the head started
        self.sort_key = lambda name: NodeView(name, "", 0, 0).sort_key
        self.intercom = HeadIntercom(settings, self.jobs, self.send)  # keys and commands of a job's processes

    # --- start and loop ------------------------------------------------------

    def open(self) -> None:
        uri = store.database_uri(self.settings.mongodb_uri, self.settings.db_uri_file)
        store.connect(uri, self.settings.db_name, self.settings.db_timeout)
        self.registry.load()
        self.jobs.load()
        self.intercom.open()
        self.admin_policy = store.get_policy()  # only this head changes it
        ctx = zmq.Context.instance()
        self.router = ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.router_handover = True  # a reconnecting node takes over its routing id
        if self.settings.curve:
            from cm.keys import Gatekeeper, secure_server

            self.gatekeeper = Gatekeeper(ctx, self.settings.run_dir)
            secure_server(self.router, self.settings.run_dir)
        self.router.bind(f"tcp://{self.settings.bind_host}:{self.settings.head_port}")
        self.clients = ClientServer(self.settings.socket_path, self.settings.operator_group,
                                    max_request=self.settings.max_request_kb << 10,
                                    client_timeout=self.settings.client_timeout,
                                    max_per_user=self.settings.max_clients_per_user)
        self._resend_unfinished()
        from cm.api.server import ApiServer

        self.api = ApiServer(self.settings)
        self.api.start()
        event(log, "head listening", port=self.settings.head_port, socket=str(self.settings.socket_path))

    def close(self) -> None:
        self.intercom.close()
        if self.api is not None:
            self.api.stop()
            self.api = None
        if self.gatekeeper is not None:
            self.gatekeeper.stop()
            self.gatekeeper = None
        if self.clients:
            self.clients.shutdown()
            self.clients = None
        if self.router:
            self.router.close(0)
            self.router = None

    def run(self, stop: threading.Event) -> None:
        self.open()
        try:
            next_tick = 0.0
            while not stop.is_set():
                now = time.monotonic()
                if self.stale:
                    self.recover()
                if now >= next_tick:
                    self.tick(now)
                    next_tick = now + min(0.25, self.settings.heartbeat_interval / 2)
                wake = min(next_tick, self.next_pass) if self.dirty else next_tick
                due = self.jobs.next_flush(RUNNING_HOLD)
                if due is not None:
                    if due <= now:
                        self.flush(RUNNING_HOLD)
                    else:
                        wake = min(wake, due)
                timeout = max(0.0, min(wake - now, 0.25))
                self.poll(timeout)
                if self.dirty and not self.stale and time.monotonic() >= self.next_pass:
                    self.schedule()
                if self.waiters:
                    self.answer_waiters(time.monotonic())
        finally:
            self.close()

    def poll(self, timeout: float) -> None:
        assert self.router is not None and self.clients is not None
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.clients.listener, zmq.POLLIN)
        if self.intercom.wakeup_fd is not None:
            poller.register(self.intercom.wakeup_fd, zmq.POLLIN)
        for conn in self.clients.conns.values():
            poller.register(conn.fd, zmq.POLLIN | (zmq.POLLOUT if conn.outbox else 0))
        if self.api is not None:
            poller.register(self.api.wake_fd, zmq.POLLIN)
        ready = dict(poller.poll(int(timeout * 1000)))
        if self.router in ready:
            self.drain_router()
        if self.intercom.wakeup_fd in ready:
            self.intercom.written()
        for key, flags in ready.items():
            if key is self.router:
                continue
            if self.api is not None and key == self.api.wake_fd:
                for caller, request, to in self.api.take():
                    self.serve(caller, request, to)
                continue
            if key is self.clients.listener or key == self.clients.listener.fileno():
                self.clients.accept()
                continue
            if flags & zmq.POLLOUT and key in self.clients.conns:
                self.clients.flush(self.clients.conns[key])
            if flags & zmq.POLLIN:
                for conn, request in self.clients.read(key):
                    self.serve(conn.caller, request, SocketAnswer(self.clients, conn, request))

    def serve(self, caller: Caller, request: Request, to) -> None:
        """Answer one request from the command socket or the HTTP API (``to``: alive(), answer(reply))."""
        try:
            reply = self.answer(caller, request)
        except Later as later:
            self.waiters.setdefault(later.job_id, []).append((caller, to, request, later.deadline))
            return
        to.answer(reply)

    def answer_waiters(self, now: float) -> None:
        """Answer the long polls whose job is final now, or whose time is up."""
        for job_id, waiting in list(self.waiters.items()):
            final = job_id not in self.jobs.jobs
            keep = []
            for caller, to, request, deadline in waiting:
                if not to.alive():
                    continue  # the client went away
                if not final and now < deadline:
                    keep.append((caller, to, request, deadline))
                    continue
                to.answer(self.answer(caller, Request(op="info", args={"job_id": job_id}, id=request.id)))
            if keep:
                self.waiters[job_id] = keep
            else:
                del self.waiters[job_id]

    def answer(self, caller, request: Request) -> Reply:
        """The reply to a client's request (Later: answer a long poll when its job ends); never raises else."""
        if request.op != "ping" and not self.stale and not store.reachable():
            self.db_failed(f"request {request.op}", store.StoreError("the driver lost the server"))
        if self.stale and request.op != "ping":
            return _unavailable()
        try:
            return handle(self, caller, request)
        except Later:
            raise  # the server keeps the request and answers it later
        except (store.StoreError, store.DatabaseUnreachable) as exc:
            self.db_failed(f"request {request.op}", exc)
            return _unavailable()
        except store.DatabaseError as exc:
            return Reply(ok=False, error=f"the database refused the request: {str(exc)[:300]}",
                         code=ErrorCode.REFUSED)
        except Exception:  # a bug in one handler must not take the head down
            log.exception("request failed")
            return Reply(ok=False, error="internal error in the head; see its log", code=ErrorCode.INTERNAL)

    # --- what request handlers may use (cm.head.requests.Head) ---------------

    def nodes(self) -> dict[str, NodeInfo]:
        return self.registry.nodes

    def node_rows(self) -> list[NodeRow]:
        used = self.jobs.usage()
        rows = []
        for n in sorted(self.registry.nodes.values(), key=lambda n: self.sort_key(n.name)):
            c, m = used.get(n.name, (0, 0))
            rows.append(NodeRow(name=n.name, partition=n.partition, state=self.registry.state_of(n, c).value,
                                cpus=n.cpus, cpus_free=n.cpus - c, mem_mb=n.mem_mb, mem_free_mb=n.mem_mb - m,
                                reason=n.reason))
        return rows

    def active(self, job_id: int) -> Job | None:
        return self.jobs.jobs.get(job_id)

    def find(self, job_id: int) -> Job | None:
        return self.jobs.find(job_id)

    def listed(self, all_jobs: bool) -> list[Job]:
        if all_jobs:
            known = {j["_id"]: j for j in self.jobs.store.recent_jobs(None)}
            known.update(self.jobs.jobs)  # memory is newer for unfinished jobs (progress)
            return [j for _, j in sorted(known.items())]
        return sorted(self.jobs.shown(), key=lambda j: j["_id"])

    def why_waiting(self, job_id: int) -> str | None:
        return self.jobs.why_waiting(job_id)

    def waiting(self, uid: int) -> int:
        waiting = (JobState.PENDING.value, JobState.HELD.value)
        return sum(1 for j in self.jobs.jobs.values() if j["uid"] == uid and j["state"] in waiting)

    def submitted_with(self, uid: int, key: str) -> int | None:
        return self.jobs.submitted_with(uid, key)

    def submit(self, fields: dict) -> Job:
        job = self.jobs.submit(fields)
        self.dirty = True
        return job

    def delete(self, job_id: int) -> None:
        self.jobs.delete(job_id)

    def cancel(self, job_id: int) -> str:
        out = Outcome()
        state = self.jobs.cancel(job_id, out)
        self.apply(out)
        return state

    def hold(self, job_id: int, held: bool) -> bool:
        self.dirty = True
        return self.jobs.hold(job_id, held)

    def set_priority(self, job_id: int, priority: int) -> bool:
        self.dirty = True
        return self.jobs.set_priority(job_id, priority)

    def set_drain(self, node: str, drain: bool, reason: str) -> None:
        self.registry.set_drain(node, drain, reason)
        self.dirty = True

    def set_policy(self, **change) -> None:
        store.set_policy(**change)
        self.admin_policy.update(change)
        self.dirty = True  # pending jobs of that user wait (Blocked) or may start

    def stats(self) -> dict:
        return {"pending": len(self.jobs.requests), "active": len(self.jobs.jobs), "nodes": len(self.registry.nodes),
                "nodes_alive": sum(n.alive for n in self.registry.nodes.values()), "passes": self.passes,
                "last_pass_ms": round(self.pass_seconds * 1000, 3)}

    def metrics(self) -> dict:
        jobs: dict[str, int] = {}
        for job in self.jobs.shown():
            jobs[job["state"]] = jobs.get(job["state"], 0) + 1
        used = self.jobs.usage()
        nodes: dict[str, int] = {}
        for n in self.registry.nodes.values():
            state = self.registry.state_of(n, used.get(n.name, (0, 0))[0]).value
            nodes[state] = nodes.get(state, 0) + 1
        syncs = [j.get("progress") or {} for j in self.jobs.jobs.values() if j["kind"] == "sync"]
        return {"jobs": jobs, "nodes": nodes, "moved": dict(self.moved),
                "sync_bytes_in_flight": sum(p.get("bytes_done", 0) for p in syncs),
                "sync_rate": sum(p.get("rate", 0) for p in syncs), "pass_seconds": self.pass_seconds,
                "passes": self.passes, "waiters": sum(len(w) for w in self.waiters.values())}

    def api_token(self, uid: int, user: str, lifetime: float = 0) -> str:
        from cm.api import tokens

        return tokens.issue(self.settings.run_dir, uid, user, lifetime)

    def revoke_api_token(self, uid: int, user: str) -> None:
        from cm.api import tokens

        tokens.revoke(uid, user)
        if self.api is not None:
            self.api.forget_tokens()  # the tokens it has checked lately

    # --- database outages ----------------------------------------------------

    def db_failed(self, where: str, exc: Exception) -> None:
        """A write failed part-way: memory may now differ from the database, so it is reloaded before use."""
        if not self.stale:
            event(log, "database unreachable; waiting for it", logging.ERROR, where=where, error=str(exc)[:300])
        self.stale = True
        self.held_acks.clear()  # not written: the nodes report again

    def recover(self) -> None:
        """Reload jobs from the database once it answers again; until then, keep waiting."""
        if not store.ping(0.5):
            return
        try:
            self.jobs.load()
        except (store.StoreError, store.DatabaseError):
            return
        self.stale = False
        self.dirty = True
        self._resend_unfinished()
        event(log, "database back; jobs reloaded", active=len(self.jobs.jobs))

    def flush(self, hold: float = 0.0) -> None:
        """Write the starts held back longer than `hold` seconds, then acknowledge what is written."""
        try:
            self.jobs.flush(older_than=hold)
        except (store.StoreError, store.DatabaseError) as exc:
            self.db_failed("writing job starts", exc)
            return
        waiting = []
        for peer, job_id, ack in self.held_acks:
            if self.jobs.unsaved(job_id):
                waiting.append((peer, job_id, ack))
            else:
                self.send(peer, ack)
        self.held_acks = waiting

    def drain_router(self) -> None:
        try:
            self._drain_router()
        finally:
            self.flush(RUNNING_HOLD)

    def _drain_router(self) -> None:
        assert self.router is not None
        for _ in range(10000):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) != 2:
                event(log, "dropped message with wrong framing", logging.WARNING, frames=len(frames))
                continue
            if self.gatekeeper is not None and not self.gatekeeper.speaks_for(frames[1].get("User-Id"),
                                                                             frames[0].bytes.decode("utf-8", "replace")):
                # a node's name is its key's: another node's, or a revoked one, is not heard; told it is unknown,
                # the node says hello again, and then connects again with the key it has now (or is refused)
                self._send_raw(frames[0].bytes, Error(ref="", message="this connection's key is not this node's "
                                                      "(revoked or replaced)", code=ErrorCode.UNKNOWN_NODE))
                continue
            identity, payload = frames[0].bytes, frames[1].bytes
            try:
                msg = decode(payload)
                self.on_node_message(identity.decode("utf-8", "replace"), msg)
            except OtherVersion as exc:
                self.refuse_version(identity, exc)
            except ProtocolError as exc:
                event(log, "bad node message", logging.WARNING, peer=identity[:64].hex(), error=str(exc))
                self._send_raw(identity, Error(ref="", message=f"bad message: {exc}", code=ErrorCode.BAD_MESSAGE))
            except (store.StoreError, store.DatabaseError) as exc:
                self.db_failed(f"handling {msg.TYPE} from {identity[:64]!r}", exc)

    def refuse_version(self, identity: bytes, exc: OtherVersion) -> None:
        """A node of another version never joins: it is told why, naming both versions, at every try."""
        name = identity[:64].decode("utf-8", "replace")
        theirs = exc.envelope
        text = version_refusal(name, theirs.version if theirs.t == "hello" else None, theirs.v)
        if self.other_versions.due(name):
            event(log, f"refused a node of another version: {text}", logging.ERROR, node=name,
                  node_version=theirs.version, node_protocol=theirs.v)
        self._send_raw(identity, Error(ref="", message=text, code=ErrorCode.REFUSED))

    # --- node messages -------------------------------------------------------

    def on_node_message(self, peer: str, msg: Message) -> None:
        node = getattr(msg, "node", peer)
        if node != peer:
            self.send(peer, Error(ref=msg.id, message=f"node field {node!r} does not match routing id",
                                  code=ErrorCode.BAD_MESSAGE))
            return
        now = time.monotonic()
        if self.stale and isinstance(msg, (Hello, JobStarted, JobEnded)):
            return  # needs the database; the node sends it again until acknowledged
        out = Outcome()
        if isinstance(msg, Hello):
            self.on_hello(msg, now, out)
        elif isinstance(msg, Heartbeat):
            if not self.registry.seen(peer, now):
                self.send(peer, Error(ref=msg.id, message="unknown node: say hello", code=ErrorCode.UNKNOWN_NODE))
                return
            if not self.stale:
                self.reconcile(peer, msg.running, msg.shares, msg.ending, out)
        elif not self.registry.seen(peer, now):
            self.send(peer, Error(ref=msg.id, message="unknown node: say hello", code=ErrorCode.UNKNOWN_NODE))
            return
        elif isinstance(msg, JobStarted):
            self._drop_unacked(peer, msg.job_id, RunJob, msg.run, msg.role, msg.rank)
            self.jobs.started(msg.job_id, peer, msg.run, self.addrs(), out, msg.role, msg.rank, msg.at)
            self.held_acks.append((peer, msg.job_id, Ack(ref=msg.id)))  # acknowledged once written: see flush()
        elif isinstance(msg, JobEnded):
            try:
                state = JobState(msg.state)
            except ValueError:
                self.send(peer, Error(ref=msg.id, message=f"unknown state {msg.state!r}", code=ErrorCode.BAD_MESSAGE))
                return
            if not state.final:
                self.send(peer, Error(ref=msg.id, message=f"state {msg.state} is not final", code=ErrorCode.BAD_MESSAGE))
                return
            self._drop_unacked(peer, msg.job_id, RunJob, msg.run, msg.role, msg.rank)
            self.jobs.ended(msg.job_id, peer, msg.run, state, msg.exit_code, msg.reason, out, msg.role, msg.rank,
                            msg.at)
            self.send(peer, Ack(ref=msg.id))
            self.dirty = True
        elif isinstance(msg, Progress):
            self.jobs.progress(msg.job_id, f"{peer}/{msg.rank}", msg.run, report_of(msg))
            if msg.stats is not None:
                self.send(peer, Ack(ref=msg.id))  # final counters are reported reliably
        elif isinstance(msg, INTERCOM_TO_HEAD):
            self.intercom.on_node(peer, msg)
        elif isinstance(msg, Ack):
            self.unacked.pop(msg.ref, None)
        elif isinstance(msg, Error):
            event(log, "node reported an error", logging.WARNING, node=peer, ref=msg.ref, error=msg.message,
                  code=msg.code.value)
        else:
            self.send(peer, Error(ref=msg.id, message=f"{msg.TYPE} is not a node-to-head message",
                                  code=ErrorCode.BAD_MESSAGE))
        self.apply(out)

    def on_hello(self, msg: Hello, now: float, out: Outcome) -> None:
        _, restarted = self.registry.hello(msg, now)
        if restarted:
            self.jobs.node_lost(msg.node, "node daemon restarted", out, self.alive())
        self.send(msg.node, Welcome(heartbeat_interval=self.settings.heartbeat_interval, kill=[]))
        self.reconcile(msg.node, msg.running, msg.shares, msg.ending, out)
        # whatever it missed while away, send again now
        for msg_id, (target, command, _) in list(self.unacked.items()):
            if target == msg.node:
                self.resend(msg_id, target, command)
        self.dirty = True

    def reconcile(self, node: str, running: list[int], shares: list, ending: list, out: Outcome) -> None:
        """Make the head and a node agree on its slots (on HELLO and on every heartbeat).

        A share the node runs that no active job gives it is stopped; a share it runs that the head
        did not know had started is marked started; a started slot the node neither runs nor has just
        ended is lost (see JobTable.check_node).
        """
        addrs = None
        legacy = set(running) if running and not shares else None  # an older node names jobs, not shares
        for job_id, run, role, rank in shares:
            job = self.jobs.jobs.get(job_id)
            if not self.jobs.wants(node, job_id, run, role, rank):
                if job_id not in self.jobs.stopping:  # those are being stopped already
                    out.kill.append(Stop(node, job_id, JobState.CANCELLED.value, run, role, rank,
                                         "the head does not know this share"))
            elif job is not None and not all(job["slots"][i]["started"]
                                             for i in self.jobs.matching(job, node, role, rank)):
                addrs = addrs if addrs is not None else self.addrs()
                self.jobs.started(job_id, node, run, addrs, out, role, rank)
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

    # --- sending -------------------------------------------------------------

    def _send_raw(self, identity: bytes, msg: Message) -> None:
        assert self.router is not None
        try:
            self.router.send_multipart([identity, encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # peer gone; reliable commands are resent from self.unacked

    def send(self, node: str, msg: Message) -> None:
        self._send_raw(node.encode(), msg)

    def command(self, node: str, msg: Message) -> None:
        """Send a command that must be acknowledged; resent until it is."""
        if isinstance(msg, KillJob) and any(
                target == node and isinstance(c, KillJob) and (c.job_id, c.run, c.role, c.rank)
                == (msg.job_id, msg.run, msg.role, msg.rank) for target, c, _ in self.unacked.values()):
            return  # the same stop is on its way already
        self.unacked[msg.id] = (node, msg, time.monotonic())
        info = self.registry.nodes.get(node)
        if info is not None and info.alive:
            self.send(node, msg)

    def resend(self, msg_id: str, node: str, command: Message) -> None:
        """Send an unacknowledged command again, unless the job no longer wants it there.

        A RunJob outlives its purpose when the job ended or moved on meanwhile (e.g. the
        node's daemon restarted and its share was declared lost): sent again, a fresh
        daemon with no memory of the job would start it a second time.
        """
        if isinstance(command, RunJob) and (
                command.job_id in self.jobs.stopping
                or not self.jobs.wants(node, command.job_id, command.spec.run, command.spec.role,
                                       command.spec.rank)):
            del self.unacked[msg_id]
            return
        self.send(node, command)
        self.unacked[msg_id] = (node, command, time.monotonic())

    def _drop_unacked(self, node: str, job_id: int, kind: type, run: int | None = None, role: str = "",
                      rank: int = -1) -> None:
        """Forget commands of `kind` for a job on a node; for RunJob, only those of that run, role and rank
        when given (run None or 0: any run; role "": any role; rank -1: any rank)."""
        for msg_id, (target, command, _) in list(self.unacked.items()):
            if target != node or not isinstance(command, kind) or getattr(command, "job_id", None) != job_id:
                continue
            if isinstance(command, RunJob):
                spec = command.spec
                if run and spec.run != run:
                    continue  # a report about another run says nothing about this one
                if role and (spec.role != role or (rank >= 0 and spec.rank != rank)):
                    continue  # nor one about another share of the same run
            del self.unacked[msg_id]

    def apply(self, out: Outcome) -> None:
        for node, job_id, spec in out.run:
            self.command(node, RunJob(job_id=job_id, spec=spec))
        for stop in out.kill:
            self._drop_unacked(stop.node, stop.job_id, RunJob, stop.run, stop.role, stop.rank)  # never start what is being stopped
            self.command(stop.node, KillJob(job_id=stop.job_id, state=stop.state, reason=stop.reason, run=stop.run,
                                            role=stop.role, rank=stop.rank))
        for node, reason in out.drain:
            if node in self.registry.nodes and not self.registry.nodes[node].drain:
                self.registry.set_drain(node, True, reason)
                event(log, "node drained", logging.WARNING, node=node, reason=reason)
        for job_id in out.finished:
            job = self.jobs.recent.get(job_id)
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

    def alive(self) -> dict[str, int]:
        """Usable nodes per partition."""
        counts: dict[str, int] = {}
        for n in self.registry.nodes.values():
            if n.alive and not n.drain:
                counts[n.partition] = counts.get(n.partition, 0) + 1
        return counts

    def addrs(self) -> dict[str, str]:
        return {n.name: n.transfer_addr for n in self.registry.nodes.values()}

    # --- timers and scheduling -----------------------------------------------

    def tick(self, now: float) -> None:
        if self.gatekeeper is not None:
            self.gatekeeper.refresh()
        if self.clients is not None:
            self.clients.reap(now)
        if self.stale:
            return
        self.intercom.tick(now)
        try:
            out = Outcome()
            for node in self.registry.expire(now):
                self.jobs.node_lost(node.name, f"node {node.name} stopped answering", out, self.alive())
                self.dirty = True
            self.jobs.expire_stops(now, out)
            self.jobs.overdue(time.time(), self.settings.kill_grace + self.settings.kill_confirm
                              + self.settings.heartbeat_timeout, out)
            self.apply(out)
        except (store.StoreError, store.DatabaseError) as exc:
            self.db_failed("in timers", exc)
        retry = self.settings.dispatch_retry
        for msg_id, (node, command, sent) in list(self.unacked.items()):
            info = self.registry.nodes.get(node)
            if now - sent >= retry and info is not None and info.alive:
                self.resend(msg_id, node, command)

    def blocked(self, job: Job) -> bool:
        """Whether an administrator's block keeps this job waiting (root's jobs are never blocked)."""
        policy = self.admin_policy
        return job.get("uid") != 0 and bool(policy.get("block_all") or job["user"] in policy.get("blocked_users", ()))

    def schedule(self) -> None:
        self.dirty = False
        pending = self.jobs.pending()
        if not pending:
            return
        started = time.monotonic()
        try:
            nodes = self.jobs.views(self.registry.nodes.values())
            if self.admin_policy.get("block_all") or self.admin_policy.get("blocked_users"):
                pending = [r for r in pending if not self.blocked(self.jobs.jobs[r.job_id])]
            plan = self.scheduler.plan(pending, nodes, self.jobs.running(), time.time())
            self.jobs.set_reasons(self.scheduler.reasons, blocked=self.blocked)
            out = Outcome()
            addrs = self.addrs()
            planned = time.monotonic()
            for request, assignment in plan:
                self.jobs.dispatch(request.job_id, assignment, addrs, out)
            self.apply(out)
            self.pass_seconds = planned - started
            self.passes += 1
            self.next_pass = time.monotonic() + 2 * self.pass_seconds
        except (store.StoreError, store.DatabaseError) as exc:
            self.db_failed("while scheduling", exc)

