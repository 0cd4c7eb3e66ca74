"""The head daemon's loop: node messages on a ROUTER, clients on a Unix socket and the HTTP API.

``HeadLoop`` only polls the sockets, decodes, turns what arrived and the timers into events for
``HeadState`` (cm.head.state) and carries out the instructions it returns (cm.head.events): it sends,
keeps commands in the ``Outbox`` until nodes acknowledge them, answers clients and holds long polls.
One thread owns all head state, so nothing here needs a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import zmq

from cm import store
from cm.config import Settings
from cm.callers import Caller
from cm.acct import Purger
from cm.head.clients import ClientServer, Connection
from cm.head.events import (Answer, ClientAsked, Command, DbBack, DbLost, Delivered, Event, Flush, Forget,
                            ForgetTokens, Instruction, Intercom, NodeSaid, Notify, NotifyFailed, Park, Pass, Resend, Send,
                            Tick)
from cm.head.intercom import HeadIntercom
from cm.head.jobs import JobTable
from cm.head.notify import Notifier
from cm.head.policies import get_policy
from cm.head.record import Recorder
from cm.head.registry import Registry
from cm.head.requests import job_view
from cm.head.scheduler import Scheduler
from cm.head.state import HeadState
from cm.keys import TRANSFER_SECRET, secret
from cm.logs import Sometimes, event
from cm.outbox import Outbox
from cm.protocol import (Error, ErrorCode, Info, KillJob, Message, OtherVersion, ProtocolError, Reply, Request, decode,
                         encode, version_refusal)
from cm.store.jobstore import MongoJobStore
from cm.store.notify import record_failure

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


class HeadLoop:
    def __init__(self, settings: Settings):
        self.settings = settings
        jobs = JobTable(MongoJobStore(), stop_timeout=settings.kill_grace + settings.kill_confirm,
                        transfer_secret=secret(settings.run_dir, TRANSFER_SECRET))
        self.state = HeadState(settings, jobs, Registry(settings.heartbeat_timeout),
                               Scheduler(get_policy(settings.policy), settings.backfill))
        self.outbox = Outbox(settings.dispatch_retry)  # commands to nodes not yet acknowledged
        self.router: zmq.Socket | None = None
        self.gatekeeper = None  # CurveZMQ key checks, when curve is on
        self.other_versions = Sometimes()  # nodes refused for their version, by name
        self.clients: ClientServer | None = None
        # long polls ("wait"): job id -> [(caller, where the answer goes, request, deadline)], answered when
        # the job is final; the answer goes to a command-socket connection or to the HTTP API (cm.api)
        self.waiters: dict[int, list[tuple[Caller, Any, Request, float]]] = {}
        self.api = None  # cm.api.server.ApiServer: the HTTP API's thread, which hands requests to this loop
        self.intercom = HeadIntercom(settings, jobs, self.send)  # keys and commands of a job's processes
        self.record = Recorder(settings.head_events, settings) if settings.head_events else None
        self.other_versions = Sometimes()  # nodes refused for their version, by name
        self.purger = Purger(settings.acct_days)  # its own thread, beside the loop
        self.notifier = Notifier.for_site(settings, job_view, record_failure)  # webhooks, never waited on

    # --- start and loop ------------------------------------------------------

    def open(self) -> None:
        uri = store.database_uri(self.settings.mongodb_uri, self.settings.db_uri_file)
        store.connect(uri, self.settings.db_name, self.settings.db_timeout)
        now, wall = time.monotonic(), time.time()
        opened = self.state.open(now, wall)
        if self.record is not None:
            self.record.opened(now, wall, opened)
        self.intercom.open()
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
        self.carry_out(opened)
        from cm.api.server import ApiServer

        self.api = ApiServer(self.settings)
        self.api.start()
        self.purger.start()  # accounting: finished jobs past CM_ACCT_DAYS go (cm.acct)
        self.notifier.start()
        event(log, "head listening", port=self.settings.head_port, socket=str(self.settings.socket_path))

    def close(self) -> None:
        self.purger.stop()
        self.notifier.stop()
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
        if self.record is not None:
            self.record.close()
            self.record = None

    def feed(self, kind: type[Event], *args: Any) -> None:
        ev = kind(time.monotonic(), time.time(), *args)
        instructions = self.state.handle(ev)
        if self.record is not None:
            self.record.handled(ev, instructions)
        self.carry_out(instructions)

    def run(self, stop: threading.Event) -> None:
        self.open()
        try:
            next_tick = 0.0
            while not stop.is_set():
                now = time.monotonic()
                if not self.state.up and store.ping(0.5):
                    self.feed(DbBack)
                if now >= next_tick:
                    self.tick(now)
                    next_tick = now + min(0.25, self.settings.heartbeat_interval / 2)
                wake = next_tick
                due = self.state.pass_due(now)
                if due is not None:
                    wake = min(wake, due)
                flush = self.state.next_flush(RUNNING_HOLD)
                if flush is not None:
                    if flush <= now:
                        self.feed(Flush, RUNNING_HOLD)
                    else:
                        wake = min(wake, flush)
                self.poll(max(0.0, min(wake - now, 0.25)))
                due = self.state.pass_due(time.monotonic())
                if due is not None and time.monotonic() >= due:
                    self.feed(Pass)
                if self.waiters:
                    self.answer_waiters(time.monotonic())
        finally:
            self.close()

    def tick(self, now: float) -> None:
        if self.gatekeeper is not None:
            self.gatekeeper.refresh()
        if self.clients is not None:
            self.clients.reap(now)
        for job_id, failure in self.notifier.taken():  # failed webhooks, shown on the job kept in memory
            self.feed(NotifyFailed, job_id, failure)
        if not self.state.up:
            return  # commands wait for the database: what they ask may no longer hold
        self.intercom.tick(now)
        self.feed(Tick)
        for msg_id, node, command in self.outbox.due(now):
            info = self.state.registry.nodes.get(node)
            if info is not None and info.alive:
                self.resend(msg_id, node, command)

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
        """One request from the command socket or the HTTP API (``to``: alive(), answer(reply))."""
        if request.op != "ping" and self.state.up and not store.reachable():
            self.feed(DbLost, f"request {request.op}", "the driver lost the server")
        self.feed(ClientAsked, caller, request, to)

    def answer_waiters(self, now: float) -> None:
        """Answer the long polls whose job is final now, or whose time is up."""
        for job_id, waiting in list(self.waiters.items()):
            final = self.state.final(job_id)
            keep = []
            for caller, to, request, deadline in waiting:
                if not to.alive():
                    continue  # the client went away
                if not final and now < deadline:
                    keep.append((caller, to, request, deadline))
                    continue
                self.feed(ClientAsked, caller, Info(job_id=job_id, id=request.id), to)
            if keep:
                self.waiters[job_id] = keep
            else:
                del self.waiters[job_id]
        self.state.waiters = sum(len(w) for w in self.waiters.values())

    def drain_router(self) -> None:
        assert self.router is not None
        for _ in range(10000):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
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
            except OtherVersion as exc:
                self.refuse_version(identity, exc)
                continue
            except ProtocolError as exc:
                event(log, "bad node message", logging.WARNING, peer=identity[:64].hex(), error=str(exc))
                self._send_raw(identity, Error(ref="", message=f"bad message: {exc}", code=ErrorCode.BAD_MESSAGE))
                continue
            self.feed(NodeSaid, identity.decode("utf-8", "replace"), msg)
        self.feed(Flush, RUNNING_HOLD)

    def refuse_version(self, identity: bytes, exc: OtherVersion) -> None:
        """A node of another version never joins: it is told why, naming both versions, at every try."""
        name = identity[:64].decode("utf-8", "replace")
        theirs = exc.envelope
        text = version_refusal(name, theirs.version if theirs.t == "hello" else None, theirs.v)
        if self.other_versions.due(name):
            event(log, f"refused a node of another version: {text}", logging.ERROR, node=name,
                  node_version=theirs.version, node_protocol=theirs.v)
        self._send_raw(identity, Error(ref="", message=text, code=ErrorCode.REFUSED))

    # --- carrying out ----------------------------------------------------------

    def carry_out(self, instructions: list[Instruction]) -> None:
        for ins in instructions:
            if isinstance(ins, Send):
                self.send(ins.node, ins.msg)
            elif isinstance(ins, Command):
                self.command(ins.node, ins.msg, ins.now)
            elif isinstance(ins, Forget):
                self.outbox.drop(ins.matches)
            elif isinstance(ins, Delivered):
                self.outbox.ack(ins.ref)
            elif isinstance(ins, Resend):
                for msg_id, command in self.outbox.to(ins.node):
                    self.resend(msg_id, ins.node, command)
            elif isinstance(ins, Answer):
                ins.to.answer(ins.reply)
            elif isinstance(ins, Park):
                self.waiters.setdefault(ins.job_id, []).append((ins.caller, ins.to, ins.request, ins.deadline))
            elif isinstance(ins, Intercom):
                self.intercom.on_node(ins.node, ins.msg)
            elif isinstance(ins, Notify):
                (self.notifier.began if ins.event == "begin" else self.notifier.ended)(ins.job)
            elif isinstance(ins, ForgetTokens):
                if self.api is not None:
                    self.api.forget_tokens()

    def _send_raw(self, identity: bytes, msg: Message) -> None:
        assert self.router is not None
        try:
            self.router.send_multipart([identity, encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # peer gone; reliable commands are resent from the outbox

    def send(self, node: str, msg: Message) -> None:
        self._send_raw(node.encode(), msg)

    def command(self, node: str, msg: Message, now: bool = True) -> None:
        """Send a command that must be acknowledged; resent until it is."""
        if isinstance(msg, KillJob) and any(
                isinstance(c, KillJob) and c.share == msg.share for _, c in self.outbox.to(node)):
            return  # the same stop is on its way already
        self.outbox.put(node, msg, time.monotonic())
        if now:
            self.send(node, msg)

    def resend(self, msg_id: str, node: str, command: Message) -> None:
        """Send an unacknowledged command again, unless the job no longer wants it there."""
        if not self.state.still_wanted(node, command):
            self.outbox.ack(msg_id)
            return
        self.send(node, command)
        self.outbox.sent(msg_id, time.monotonic())
