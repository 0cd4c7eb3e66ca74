"""The node's end of the intercom: one Unix socket per command-job share, served from the daemon's loop.

Each share gets a directory under RUN_DIR/intercom owned by the job's user (0700) holding the
socket, so no other user can connect. Who speaks is found, not told: the socket says which job,
and the peer's pid (SO_PEERCRED) is walked up its parents to one of the rank processes this node
launched, so a process can speak neither for another job nor for another rank.

Everything is non-blocking. A new connection is first told whether it is taken (Done(0)) or
refused (Failed, with the reason). A connection holds at most MAX_INFLIGHT requests and
``max_out`` bytes of answers. A request that does not fit its schema (cm.intercom: an empty key, a
rank below 0) is refused naming the field; a connection that sends what is not a request at all, or
does not read what it asked for, is closed, and only it. Requests that need the head go over the
daemon's link as Intercom* messages (cm.protocol); gets and fences still waiting are asked again
after every (re)welcome, so they survive a head restart.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import msgspec

from cm.config import Settings
from cm.framing import FrameTooBig, unframe
from cm.intercom import (
    Done,
    Failed,
    Fence,
    Frame,
    Get,
    Put,
    Recv,
    Request,
    Send,
    Subscribe,
    Update,
    oversize,
    pack,
)
from cm.logs import event
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
    ShareKey,
    named,
)

log = logging.getLogger("cm.node.intercom")
MAX_INFLIGHT = 16  # requests one connection may have unanswered
MAX_CONNECTIONS = 256  # connections to one job's socket at once
SOCKET_PATH_MAX = 107

_requests = msgspec.msgpack.Decoder(Request)


class _Numbered(msgspec.Struct):
    t: str = ""
    req: int = 0


_numbered = msgspec.msgpack.Decoder(_Numbered)  # the number of a request that does not fit, to refuse it by
_KINDS = {kind.__struct_config__.tag for kind in Request.__args__}


class IntercomSetupError(RuntimeError):
    """A job's intercom socket cannot be made."""


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    job: "JobSocket"
    rank: int
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    inflight: int = 0
    subscribed: bool = False

    @property
    def fd(self) -> int:
        return self.sock.fileno()


@dataclass(eq=False)
class Call:
    """A request waiting for the head, an update, a fence or a command."""

    conn: Conn
    req: int
    op: str
    deadline: float | None
    msg: Message | None = None  # what went to the head (asked again after a welcome)
    key: str = ""
    epoch: int = 0
    replies: bool = False  # a recv that takes only replies


@dataclass(eq=False)
class JobSocket:
    share: ShareKey
    uid: int
    directory: Path
    listener: socket.socket
    procs: int
    ranks: dict[int, tuple[int, subprocess.Popen]] = field(default_factory=dict)  # pid of a rank process -> rank
    queues: dict[int, collections.deque] = field(default_factory=dict)  # rank -> (text, sender, reply)
    fence_done: int = 0

    @property
    def path(self) -> str:
        return str(self.directory / "sock")


class NodeIntercom:
    def __init__(self, settings: Settings, name: str, send: Callable[[Message], None]):
        self.settings = settings
        self.name = name
        self.send = send  # to the head
        self.root = Path(settings.run_dir) / "intercom"
        self.jobs: dict[ShareKey, JobSocket] = {}
        self.listeners: dict[int, JobSocket] = {}
        self.conns: dict[int, Conn] = {}
        self.calls: dict[str, Call] = {}  # by the id of the message to the head (or a local id)
        self.waits: list[Call] = []  # gets waiting for an update, fences, recvs
        self.max_frame = settings.intercom_value_bytes + settings.intercom_key_bytes + 1024
        self.max_out = 4 * self.max_frame + (1 << 20)
        for left in self.root.glob(f"{self.name}.*"):  # sockets of a daemon of this node that died
            shutil.rmtree(left, ignore_errors=True)

    # --- sockets of shares ----------------------------------------------------------

    def open(self, share: ShareKey, uid: int, gid: int, procs: int) -> str:
        """Make the share's socket; return its path (CM_INTERCOM). Raises IntercomSetupError."""
        directory = self.root / f"{self.name}.{share.job_id}.{share.run}"
        if len(str(directory / "sock")) > SOCKET_PATH_MAX:
            raise IntercomSetupError(f"intercom socket path {directory}/sock is too long for a Unix socket")
        try:
            self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chmod(self.root, 0o755)  # whatever the umask: users must reach their own directories
            if directory.exists():  # left by a daemon that died
                shutil.rmtree(directory)
            directory.mkdir(mode=0o700)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(directory / "sock"))
            os.chmod(directory / "sock", 0o600)
            if os.geteuid() == 0:
                os.chown(directory / "sock", uid, gid)
                os.chown(directory, uid, gid)
            listener.listen(64)
            listener.setblocking(False)
        except OSError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise IntercomSetupError(f"cannot make the intercom socket in {directory}: {exc}") from None
        js = JobSocket(share, uid, directory, listener, procs)
        self.jobs[share] = js
        self.listeners[listener.fileno()] = js
        return js.path

    def attach(self, share: ShareKey, procs: list[subprocess.Popen]) -> None:
        """The share's rank processes (in local rank order), so speakers can be told apart."""
        js = self.jobs.get(share)
        if js is not None:
            first = share.rank * js.procs
            js.ranks = {p.pid: (first + i, p) for i, p in enumerate(procs)}
            js.queues = {first + i: collections.deque() for i in range(len(procs))}

    def close(self, share: ShareKey) -> None:
        """The share ended: its waiting callers hear so, its connections and socket go."""
        js = self.jobs.pop(share, None)
        if js is None:
            return
        for conn in [c for c in self.conns.values() if c.job is js]:
            self._fail_all(conn, ErrorCode.ENDED, f"job {share.job_id} (run {share.run}) ended on {self.name}")
            self._flush(conn)
            self._drop(conn)
        self.listeners.pop(js.listener.fileno(), None)
        js.listener.close()
        shutil.rmtree(js.directory, ignore_errors=True)

    def close_all(self) -> None:
        for share in list(self.jobs):
            self.close(share)

    # --- the daemon's poller ----------------------------------------------------------

    def fds(self) -> list[tuple[int, int]]:
        """(fd, events) to poll: 1 readable, 4 writable (as zmq.POLLIN, zmq.POLLOUT)."""
        out = [(fd, 1) for fd in self.listeners]
        out += [(fd, 1 | (4 if c.outbuf else 0)) for fd, c in self.conns.items()]
        return out

    def on_ready(self, ready: dict) -> None:
        for fd, flags in ready.items():
            if not isinstance(fd, int):
                continue
            if fd in self.listeners:
                self._accept(self.listeners[fd])
            elif fd in self.conns:
                conn = self.conns[fd]
                if flags & 4:
                    self._flush(conn)
                if flags & 1 and conn.fd in self.conns:
                    self._read(conn)

    def tick(self, now: float) -> None:
        """Fail what waited past its deadline."""
        for ref, call in list(self.calls.items()):
            if call.deadline is not None and now >= call.deadline:
                del self.calls[ref]
                if call.op == "get":  # its own timeout
                    self._fail(call, ErrorCode.TIMEOUT, "get timed out")
                else:
                    self._fail(call, ErrorCode.HEAD_UNAVAILABLE,
                               "the head did not answer in time (it may be restarting); try again")
        expired = [c for c in self.waits if c.deadline is not None and now >= c.deadline]
        if expired:
            self.waits = [c for c in self.waits if c not in expired]
            for call in expired:
                self._fail(call, ErrorCode.TIMEOUT, f"{call.op} timed out")

    def welcomed(self) -> None:
        """The head (maybe a new one) took us in: ask again what still waits for it."""
        for ref, call in list(self.calls.items()):
            if call.op == "send":
                del self.calls[ref]
                self._fail(call, ErrorCode.HEAD_UNAVAILABLE,
                           "the link to the head was renewed: not known whether the command was delivered")
            elif call.msg is not None:
                self.send(call.msg)
        for call in [c for c in self.waits if c.op == "get"]:
            # asked again: the key may have been put while we were away (its update lost with the link)
            self.waits.remove(call)
            self._ask(call)
        for call in self.waits:
            if call.op == "fence":
                self.send(call.msg)

    # --- connections ------------------------------------------------------------------

    def _accept(self, js: JobSocket) -> None:
        for _ in range(64):
            try:
                sock, _ = js.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                event(log, "intercom accept failed", logging.WARNING, job=js.share.job_id, error=str(exc))
                return
            rank, why = self._who(sock, js)
            if rank is None or sum(1 for c in self.conns.values() if c.job is js) >= MAX_CONNECTIONS:
                why = why or "too many intercom connections to this job"
                try:
                    sock.setblocking(False)
                    sock.send(pack(Failed(0, ErrorCode.REFUSED, why)))
                except OSError:
                    pass
                sock.close()
                event(log, "intercom connection refused", logging.WARNING, job=js.share.job_id, reason=why)
                continue
            sock.setblocking(False)
            conn = Conn(sock, js, rank)
            self.conns[conn.fd] = conn
            self._answer(conn, Done(0))  # taken: the client waits for this before it asks anything

    def _who(self, sock: socket.socket, js: JobSocket) -> tuple[int | None, str]:
        """The rank of the peer process (walking up from its pid), or None and why not."""
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                           struct.calcsize("3i")))
        if uid not in (js.uid, 0):
            return None, f"uid {uid} is not the job's user"
        for _ in range(64):
            if pid in js.ranks:
                rank, proc = js.ranks[pid]
                if proc.returncode is None:  # not reaped yet, so the pid is still that process's
                    return rank, ""
                break
            pid = _parent(pid)
            if pid <= 1:
                break
        return None, f"the connecting process is not one of job {js.share.job_id}'s processes on {self.name}"

    def _read(self, conn: Conn) -> None:
        try:
            chunk = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        conn.inbuf += chunk
        while conn.fd in self.conns:
            try:
                body = unframe(conn.inbuf, self.max_frame)
            except FrameTooBig as exc:
                return self._refuse(conn, str(exc))
            if body is None:
                return
            if conn.inflight >= MAX_INFLIGHT:
                return self._refuse(conn, f"more than {MAX_INFLIGHT} requests unanswered on one connection",
                                    ErrorCode.LIMIT)
            try:
                frame = _requests.decode(body)
            except msgspec.ValidationError as exc:  # a request that does not fit: refused, the connection stays
                req = _request_number(body)
                if req is None:
                    return self._refuse(conn, f"bad intercom frame: {named(exc, 'request')}")
                conn.inflight += 1
                self._answer(conn, Failed(req, ErrorCode.BAD_MESSAGE, named(exc, "request")))
                continue
            except msgspec.DecodeError as exc:
                return self._refuse(conn, f"bad intercom frame: {exc}")
            conn.inflight += 1
            try:
                self._request(conn, frame)
            except Exception:  # a bug here must not take the daemon down: this connection goes
                log.exception("intercom request failed")
                return self._refuse(conn, "internal error in the node daemon; see its log", ErrorCode.INTERNAL)

    def _refuse(self, conn: Conn, why: str, code: ErrorCode = ErrorCode.BAD_MESSAGE) -> None:
        event(log, "intercom connection closed", logging.WARNING, job=conn.job.share.job_id, rank=conn.rank, reason=why)
        self._answer(conn, Failed(0, code, why))  # sent at once as far as the socket takes it
        self._drop(conn)

    def _drop(self, conn: Conn) -> None:
        self.conns.pop(conn.fd, None)
        self.calls = {ref: c for ref, c in self.calls.items() if c.conn is not conn}
        self.waits = [c for c in self.waits if c.conn is not conn]
        conn.sock.close()

    def _answer(self, conn: Conn, frame: Frame) -> None:
        if self.conns.get(conn.fd) is not conn:
            return  # gone meanwhile
        if isinstance(frame, (Done, Failed)) and frame.req:
            conn.inflight = max(0, conn.inflight - 1)
        conn.outbuf += pack(frame)
        if len(conn.outbuf) > self.max_out:
            event(log, "intercom connection closed: it does not read", logging.WARNING, job=conn.job.share.job_id,
                  rank=conn.rank)
            self._drop(conn)
            return
        self._flush(conn)

    def _flush(self, conn: Conn) -> None:
        while conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                conn.outbuf.clear()
                return
            del conn.outbuf[:sent]

    def _fail(self, call: Call, code: ErrorCode, message: str) -> None:
        if call.conn.fd in self.conns:
            self._answer(call.conn, Failed(call.req, code, message))

    def _fail_all(self, conn: Conn, code: ErrorCode, message: str) -> None:
        for ref, call in list(self.calls.items()):
            if call.conn is conn:
                del self.calls[ref]
                self._fail(call, code, message)
        mine = [c for c in self.waits if c.conn is conn]
        self.waits = [c for c in self.waits if c.conn is not conn]
        for call in mine:
            self._fail(call, code, message)

    # --- requests from processes ------------------------------------------------------

    def _request(self, conn: Conn, frame: Request) -> None:
        js, s = conn.job, self.settings
        job_id, run = js.share.job_id, js.share.run
        now = time.monotonic()
        head_deadline = now + s.intercom_head_wait
        if isinstance(frame, (Put, Get)):
            problem = oversize("key", frame.key, s.intercom_key_bytes)
            if isinstance(frame, Put):
                problem = problem or oversize("value", frame.value, s.intercom_value_bytes)
            if problem:
                return self._answer(conn, Failed(frame.req, ErrorCode.LIMIT, problem))
        if isinstance(frame, Put):
            msg = IntercomPut(node=self.name, job_id=job_id, run=run, rank=conn.rank, key=frame.key, value=frame.value)
            self._ask(Call(conn, frame.req, "put", head_deadline, msg))
        elif isinstance(frame, Get):
            msg = IntercomGet(node=self.name, job_id=job_id, run=run, rank=conn.rank, key=frame.key)
            self._ask(Call(conn, frame.req, "get", _deadline(now, frame.timeout), msg, key=frame.key))
        elif isinstance(frame, Fence):
            epoch = js.fence_done + 1
            msg = IntercomFence(node=self.name, job_id=job_id, run=run, rank=conn.rank, epoch=epoch)
            self.waits.append(Call(conn, frame.req, "fence", _deadline(now, frame.timeout), msg, epoch=epoch))
            self.send(msg)
        elif isinstance(frame, Send):
            problem = oversize("command", frame.command, s.intercom_value_bytes)
            if problem:
                return self._answer(conn, Failed(frame.req, ErrorCode.LIMIT, problem))
            msg = IntercomSend(node=self.name, job_id=job_id, run=run, rank=conn.rank, command=frame.command,
                               ranks=frame.ranks, to=frame.to, reply=frame.reply)
            self._ask(Call(conn, frame.req, "send", head_deadline, msg))
        elif isinstance(frame, Recv):
            call = Call(conn, frame.req, "recv", _deadline(now, frame.timeout), replies=frame.replies)
            if not self._take(call):
                if call.deadline is not None and call.deadline <= now:
                    return self._answer(conn, Failed(frame.req, ErrorCode.TIMEOUT, "nothing to receive"))
                self.waits.append(call)
        elif isinstance(frame, Subscribe):
            conn.subscribed = True
            self._answer(conn, Done(frame.req))

    def _ask(self, call: Call) -> None:
        assert call.msg is not None
        self.calls[call.msg.id] = call
        self.send(call.msg)

    def _take(self, call: Call) -> bool:
        """Answer a recv from its rank's queue, if something it takes is there."""
        queue = call.conn.job.queues.get(call.conn.rank)
        if not queue:
            return False
        for i, (text, sender, is_reply) in enumerate(queue):
            if is_reply or not call.replies:
                del queue[i]
                self._answer(call.conn, Done(call.req, value=text, sender=sender))
                return True
        return False

    # --- messages from the head -------------------------------------------------------

    def on_head(self, msg: Message) -> None:
        try:
            self._on_head(msg)
        except Exception:  # a bug here must not take the daemon down
            log.exception("intercom message from the head failed", extra={"type": msg.TYPE})

    def _on_head(self, msg: Message) -> None:
        if isinstance(msg, IntercomAnswer):
            self._on_answer(msg)
        elif isinstance(msg, IntercomUpdate):
            self._on_update(msg)
        elif isinstance(msg, IntercomFenceDone):
            js = self._job(msg.job_id, msg.run)
            if js is not None:
                js.fence_done = max(js.fence_done, msg.epoch)
            done = [c for c in self.waits if c.op == "fence" and c.conn.job is js and c.epoch <= msg.epoch]
            self.waits = [c for c in self.waits if c not in done]
            for call in done:
                self._answer(call.conn, Done(call.req))
        elif isinstance(msg, IntercomDeliver):
            self._on_deliver(msg)

    def _on_answer(self, msg: IntercomAnswer) -> None:
        call = self.calls.pop(msg.ref, None)
        if call is None or call.conn.fd not in self.conns:
            return  # its caller went away
        if msg.absent:  # a get: wait for the key's first put
            self.waits.append(call)
        elif msg.code is not None:
            self._answer(call.conn, Failed(call.req, msg.code, msg.error))
        else:
            self._answer(call.conn, Done(call.req, value=msg.value, version=msg.version, count=msg.count))

    def _on_update(self, msg: IntercomUpdate) -> None:
        js = self._job(msg.job_id, msg.run)
        if js is None:
            return
        done = [c for c in self.waits if c.op == "get" and c.conn.job is js and c.key == msg.key]
        self.waits = [c for c in self.waits if c not in done]
        for call in done:
            self._answer(call.conn, Done(call.req, value=msg.value, version=msg.version))
        update = Update(msg.key, msg.value, msg.version)
        for conn in [c for c in self.conns.values() if c.subscribed and c.job is js]:
            self._answer(conn, update)

    def _on_deliver(self, msg: IntercomDeliver) -> None:
        js = self._job(msg.job_id, msg.run)
        count, refused = 0, []
        for rank in msg.ranks:
            queue = js.queues.get(rank) if js is not None else None
            if queue is None:
                refused.append(rank)
                continue
            waiting = next((c for c in self.waits if c.op == "recv" and c.conn.job is js and c.conn.rank == rank
                            and (msg.reply or not c.replies)), None)
            if waiting is not None:
                self.waits.remove(waiting)
                self._answer(waiting.conn, Done(waiting.req, value=msg.command, sender=msg.sender))
            elif len(queue) >= self.settings.intercom_queue:
                refused.append(rank)
                continue
            else:
                queue.append((msg.command, msg.sender, msg.reply))
            count += 1
        self.send(IntercomDelivered(node=self.name, ref=msg.id, count=count, refused=refused))

    def _job(self, job_id: int, run: int) -> JobSocket | None:
        return next((js for share, js in self.jobs.items() if share.job_id == job_id and share.run == run), None)


def _deadline(now: float, timeout: float | None) -> float | None:
    return None if timeout is None else now + max(0.0, timeout)


def _request_number(body: bytes) -> int | None:
    """The ``req`` of a request of a known kind that does not fit its schema (None: not a request at all)."""
    try:
        head = _numbered.decode(body)
    except msgspec.DecodeError:
        return None
    return head.req if head.t in _KINDS and head.req > 0 else None


def _parent(pid: int) -> int:
    """The parent pid of pid from /proc (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return 0
