"""The head's Unix socket for commands: who is calling comes from the kernel.

A client's identity is the peer's uid from SO_PEERCRED, never a field of its
request. Connections are non-blocking and buffered so a slow or malicious
client cannot stall the head, and bounded so it cannot hold the head's
resources: a request larger than ``max_request`` is refused from its
header, a client that takes longer than ``client_timeout`` to send a whole
request (or stays silent for ``IDLE_TIMEOUT``) is cut off, and one user may
hold at most ``max_per_user`` connections (root is not limited).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import msgspec

from cm.callers import Caller, caller_of
from cm.logs import event
from cm.protocol import (
    ClientRequest, ErrorCode, InfoData, Misfit, ProtocolError, Reply, Request, UnknownType, decode, frame, unframe,
)

log = logging.getLogger("cm.head.clients")
MAX_PENDING_OUT = 64 * 1024 * 1024
IDLE_TIMEOUT = 300.0  # seconds a connection may stay open without sending anything


def jobs_of(request: Request | None, reply: Reply) -> list[int]:
    """The jobs a request and its reply are about, for the log."""
    job_id = getattr(request, "job_id", None)
    ids = [job_id] if isinstance(job_id, int) else []
    ids += list(getattr(request, "job_ids", ()))
    if isinstance(reply.data, InfoData):
        ids += [j.id for j in reply.data.jobs if j.id not in ids]
    return ids


class Connection:
    def __init__(self, sock: socket.socket, caller: Caller):
        self.sock = sock
        self.fd = sock.fileno()
        self.caller = caller
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.last_active = time.monotonic()
        self.partial_since: float | None = None  # when the request now arriving began

    def fileno(self) -> int:
        return self.fd


class ClientServer:
    """Accepts connections and turns frames into (caller, Request) pairs."""

    def __init__(self, path: Path, operator_group: str, max_request: int = 1 << 20, client_timeout: float = 10.0,
                 max_per_user: int = 64):
        self.path = path
        self.operator_group = operator_group
        self.max_request = max_request
        self.client_timeout = client_timeout
        self.max_per_user = max_per_user
        self.conns: dict[int, Connection] = {}
        self.per_uid: dict[int, int] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        os.chmod(path, 0o666)  # anyone may ask; who they are comes from the kernel
        self.listener.listen(128)
        self.listener.setblocking(False)

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            try:
                caller = caller_of(sock, self.operator_group)
            except OSError:
                sock.close()
                continue
            conn = Connection(sock, caller)
            if caller.uid != 0 and self.per_uid.get(caller.uid, 0) >= self.max_per_user:
                event(log, "too many connections", logging.WARNING, uid=caller.uid, limit=self.max_per_user)
                conn.outbox += frame(Reply(ok=False, error=f"refused: {caller.user} already has "
                                                           f"{self.max_per_user} connections open to the head"))
                try:
                    sock.send(conn.outbox)
                except OSError:
                    pass
                sock.close()
                continue
            self.conns[conn.fd] = conn
            self.per_uid[caller.uid] = self.per_uid.get(caller.uid, 0) + 1

    def read(self, fd: int) -> list[tuple[Connection, Request]]:
        """Requests that arrived whole on fd. Garbage gets an error reply and a closed socket."""
        conn = self.conns.get(fd)
        if conn is None:
            return []
        try:
            data = conn.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return []
        conn.inbox += data
        conn.last_active = time.monotonic()
        out = []
        while True:
            try:
                body = unframe(conn.inbox, self.max_request)
                if body is None:
                    break
                msg = decode(body)
                if not isinstance(msg, ClientRequest):
                    raise ProtocolError(f"expected a request, got {msg.TYPE}")
            except (UnknownType, Misfit) as exc:  # a whole request the head understood: the connection stays
                code = ErrorCode.UNKNOWN_OPERATION if isinstance(exc, UnknownType) else ErrorCode.BAD_MESSAGE
                self.send(conn, Reply(ok=False, error=str(exc), code=code))
                continue
            except ProtocolError as exc:
                event(log, "bad client message", logging.WARNING, uid=conn.caller.uid, error=str(exc))
                self.send(conn, Reply(ok=False, error=f"bad request: {exc}", code=ErrorCode.BAD_MESSAGE))
                self.flush(conn)
                self.close(conn)
                return out
            out.append((conn, msg))
        conn.partial_since = (conn.partial_since or conn.last_active) if conn.inbox else None
        return out

    def reap(self, now: float) -> None:
        """Cut off clients that are too slow to send a request, or silent for too long."""
        for conn in list(self.conns.values()):
            slow = conn.partial_since is not None and now - conn.partial_since > self.client_timeout
            if slow or (not conn.outbox and now - conn.last_active > IDLE_TIMEOUT):
                event(log, "client cut off", logging.INFO, uid=conn.caller.uid,
                      why="request incomplete" if slow else "idle")
                if slow:
                    self.send(conn, Reply(ok=False, error=f"request not complete within {self.client_timeout:g} s"))
                self.close(conn)

    def send(self, conn: Connection, reply: Reply, about: Request | None = None) -> None:
        """Queue and send a reply (to the request ``about``). A reply that cannot be encoded costs this client
        an INTERNAL error, logged with the jobs it was about, never the head."""
        if len(conn.outbox) > MAX_PENDING_OUT:
            self.close(conn)
            return
        try:
            data = frame(reply)
        except (TypeError, OverflowError, msgspec.EncodeError) as exc:
            event(log, "reply not encodable", logging.ERROR, uid=conn.caller.uid, op=about.op if about else None,
                  jobs=jobs_of(about, reply), error=str(exc)[:300])
            data = frame(Reply(ok=False, error="internal error: the head could not encode its reply; see its log",
                               code=ErrorCode.INTERNAL))
        conn.outbox += data
        self.flush(conn)

    def flush(self, conn: Connection) -> None:
        while conn.outbox:
            try:
                sent = conn.sock.send(conn.outbox)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close(conn)
                return
            del conn.outbox[:sent]

    def close(self, conn: Connection) -> None:
        if self.conns.pop(conn.fd, None) is not None:
            left = self.per_uid.get(conn.caller.uid, 1) - 1
            if left > 0:
                self.per_uid[conn.caller.uid] = left
            else:
                self.per_uid.pop(conn.caller.uid, None)
        try:
            conn.sock.close()
        except OSError:
            pass

    def shutdown(self) -> None:
        for conn in list(self.conns.values()):
            self.close(conn)
        self.listener.close()
        try:
            self.path.unlink()
        except OSError:
            pass
