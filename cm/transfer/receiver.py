"""The receiving end of the mover: a TCP server, in a process of its own on each node.

The node daemon starts the mover (``python -m cm.transfer.receiver``) as
root and hands it the listening socket; it restarts it if it dies, so a
crash here never takes the node daemon down. For each sync job that writes
to this node's storage the daemon ``register``s the transfer (id, the run's
key, data root, destination path, and the job's identity) over the
mover's stdin. Senders connect, name the transfer in a HELLO frame, prove
they hold its key and check that the mover does (``secure``: nothing
secret crosses the wire), and then drive a ``Destination`` with sealed
requests.

No peer can hold the mover up: a connection has ``AUTH_DEADLINE`` seconds
in all to authenticate; unauthenticated connections are capped per peer
address and overall, the oldest of them cut off when a new one would pass
a cap (a flood cannot keep a sender out, who authenticates in a few
milliseconds); authenticated ones are capped per transfer and per user,
and a sender refused for a cap is told ``busy`` and tries again later.

Each connection's thread acts as the job's user on the file system
(``cm.creds.acting_as``: file-system uid, gid and groups, per thread), so
the kernel checks every create, replace and delete exactly as it would
for the user's own ``cp`` and ``rm``, and what is created belongs to the
user. Only transfers of root's or an operator's jobs may set owners
(OWNERS). Anything malformed gets an ERROR answer and the connection is
closed; the server itself keeps serving. One thread per connection;
senders open a few.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cm.creds import CredentialsError, Identity, acting_as

from . import batchio, meta, sparse
from . import frames as f
from . import secure
from .control import Answer, Register, Unregister, decode_control, encode_answer
from .destination import ChunkRefused, Destination
from .partial import chunk_count
from .paths import PathEscape, confine, wire_parts
from .wire import BUSY, MAX_BATCH, PIECE, TRAILER, VERSION, Channel, Kind, ProtocolError, listen, tune

log = logging.getLogger(__name__)

AUTH_DEADLINE = 10.0  # seconds a connection has, in all, to authenticate
IDLE_TIMEOUT = 600.0  # seconds a sender may stay silent mid-transfer
DRAIN_TIMEOUT = 10.0  # seconds a refused frame's rest may take to arrive before the connection is closed
MAX_CONNECTIONS = 512  # threads, authenticated or not
MAX_UNAUTHENTICATED = 64  # connections not yet authenticated, in all...
MAX_UNAUTHENTICATED_PER_ADDRESS = 16  # ...and from one peer address
MAX_PER_TRANSFER = 128  # authenticated connections of one transfer (ranks x streams)
MAX_PER_USER = 256  # authenticated connections of one user's transfers
RECV_PIECE = PIECE  # received, hashed and written while in cache: one piece per sender's piece


class BadRequest(ValueError):
    """A request that fits its schema but not this transfer (chunk size, owners, lengths)."""


@dataclass
class _Registration:
    key: bytes  # the run's key (``secure.run_key``)
    root: Path
    prefix: tuple[str, ...]
    who: Identity
    keep_owners: bool = False
    channels: set = field(default_factory=set)


def _chunk_size(v: int, max_chunk: int) -> int:
    # what the schema cannot say: this server's maximum (frames.ChunkSize checks the rest)
    if v > max_chunk:
        raise BadRequest(f"chunk size {v} is above this receiver's {max_chunk}")
    return v


class TransferServer:
    """Accepts sender connections for registered transfers and writes what they send."""

    def __init__(self, host: str, port: int, chunk_size: int = 64 << 20, listener: socket.socket | None = None,
                 encrypt: bool = True):
        self.host = host
        self.port = port
        self.chunk_size = chunk_size
        self.encrypt = encrypt  # records encrypted (the site's CM_DATA_ENCRYPT), or only authenticated
        self._given = listener  # already bound and listening (handed over by the node daemon)
        self._lock = threading.Lock()
        self._transfers: dict[str, _Registration] = {}
        self._threads: set[threading.Thread] = set()
        self._socks: set[socket.socket] = set()
        self._unauthenticated: dict[socket.socket, str] = {}  # oldest first: socket → peer address
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._warm: threading.Thread | None = None
        self._stopping = threading.Event()

    # ---- lifecycle ----

    def start(self) -> None:
        """Bind, listen and serve in background threads; returns once listening."""
        lsock = self._given or listen(self.host, self.port)
        self.port = lsock.getsockname()[1]
        self._listener = lsock
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"mover-accept-{self.port}", daemon=True)
        self._acceptor.start()
        # load the compiled code now rather than in the middle of the first transfer
        self._warm = threading.Thread(target=batchio.warm_up_writing, name="mover-warm-up", daemon=True)
        self._warm.start()

    def stop(self) -> None:
        """Stop accepting, close every connection and wait for the threads."""
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        if self._acceptor is not None:
            self._acceptor.join()
        if self._warm is not None:
            self._warm.join()
        with self._lock:
            socks = list(self._socks)
            threads = list(self._threads)
        for s in socks:
            _shutdown(s)
        for t in threads:
            t.join()

    # ---- transfers ----

    def register(self, transfer_id: str, token: str, root: Path, dst_path: str, who: Identity | None = None,
                 keep_owners: bool = False) -> None:
        """Allow senders proving they hold the run's key (from ``token``) to write under ``root/dst_path`` as ``who``.

        ``who`` is the job's identity (default: this process's own); every
        change to the tree is made with it. ``keep_owners`` lets the sender
        set owners (root's and operators' syncs). Raises ``PathEscape`` if
        ``dst_path`` leads outside ``root`` (resolved as ``who``). Creates
        nothing: the destination appears when the first sender writes.
        """
        if not transfer_id or not token:
            raise ValueError("transfer id and token must not be empty")
        key = secure.run_key(token)
        who = who or Identity(os.geteuid(), os.getegid(), tuple(os.getgroups()))
        real_root = Path(os.path.realpath(root))
        with acting_as(who):
            target = confine(real_root, dst_path)
        prefix = target.relative_to(real_root).parts
        with self._lock:
            old = self._transfers.get(transfer_id)
            reg = _Registration(key, real_root, tuple(prefix), who, keep_owners and who.is_root)
            if old is not None:
                reg.channels = old.channels
            self._transfers[transfer_id] = reg

    def unregister(self, transfer_id: str) -> None:
        """Forget a transfer and drop its open connections (idempotent)."""
        with self._lock:
            reg = self._transfers.pop(transfer_id, None)
            socks = list(reg.channels) if reg else []
        for s in socks:
            _shutdown(s)

    # ---- serving ----

    def _accept_loop(self) -> None:
        listener = self._listener
        while listener is not None and not self._stopping.is_set():
            try:
                sock, peer = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            with self._lock:
                if len(self._threads) >= MAX_CONNECTIONS:
                    sock.close()
                    continue
                self._make_room(peer[0])
                self._unauthenticated[sock] = peer[0]
                t = threading.Thread(target=self._serve, args=(sock, peer), name=f"mover-conn-{peer}", daemon=True)
                self._threads.add(t)
                self._socks.add(sock)
            t.start()

    def _make_room(self, address: str) -> None:
        """Cut off the oldest unauthenticated connection (of ``address``, or of all) at a cap. Holds the lock."""
        waiting = self._unauthenticated
        mine = [s for s, a in waiting.items() if a == address]
        if len(mine) >= MAX_UNAUTHENTICATED_PER_ADDRESS:
            oldest = mine[0]
        elif len(waiting) >= MAX_UNAUTHENTICATED:
            oldest = next(iter(waiting))
        else:
            return
        del waiting[oldest]
        _shutdown(oldest)

    def _serve(self, sock: socket.socket, peer) -> None:
        reg = None
        try:
            tune(sock)
            chan = Channel(sock, max_meta=4096, max_payload=0)
            reg = self._handshake(chan)
            if reg is None:
                return
            sock.settimeout(IDLE_TIMEOUT)
            chan.max_meta = 64 << 20
            chan.max_payload = max(self.chunk_size, MAX_BATCH)
            try:
                with acting_as(reg.who):  # this thread is the job's user from here on
                    self._session(chan, reg)
            except CredentialsError as exc:
                chan.reply_error(f"the receiver cannot act as uid {reg.who.uid}: {exc}")
        except (ConnectionError, TimeoutError, ProtocolError, BadRequest, OSError) as exc:
            log.info("mover connection from %s ended: %s", peer, exc)
        finally:
            if reg is not None:
                with self._lock:
                    reg.channels.discard(sock)
            sock.close()
            with self._lock:
                self._unauthenticated.pop(sock, None)
                self._socks.discard(sock)
                self._threads.discard(threading.current_thread())

    def _handshake(self, chan: Channel) -> _Registration | None:
        """HELLO, CHALLENGE, AUTH (``secure``) within ``AUTH_DEADLINE``; the transfer, or None (answered)."""
        chan.io.deadline = time.monotonic() + AUTH_DEADLINE
        try:
            kind, hello, _ = chan.recv()
            if kind != Kind.HELLO:
                chan.reply_error("expected HELLO")
                return None
            with self._lock:
                reg = self._transfers.get(hello.transfer_id)
            if reg is None:
                chan.reply_error("unknown transfer")
                return None
            mine = secure.new_nonce()
            session = secure.Session(reg.key, secure.transcript(VERSION, hello.transfer_id, hello.nonce, mine,
                                                                self.encrypt))
            chan.reply(f.Challenge(mine, session.proof("mover"), self.encrypt))
            kind, auth, _ = chan.recv()
        except ProtocolError as exc:
            chan.reply_error(str(exc))
            return None
        if kind != Kind.AUTH:
            chan.reply_error("expected AUTH")
            return None
        chan.secure(session.records(chan.sock, "mover"))  # our answer is sealed: only the key's holder reads it
        try:
            session.check("sender", auth.proof)
        except secure.AuthError as exc:
            log.warning("mover connection refused: %s", exc)
            chan.reply_error("authentication failed")
            return None
        with self._lock:
            self._unauthenticated.pop(chan.sock, None)
            refusal = self._over_caps(hello.transfer_id, reg)
            if refusal is None:
                reg.channels.add(chan.sock)
        if refusal is not None:
            chan.reply_error(f"{BUSY} {refusal}")
            return None
        chan.reply(f.Welcome(self.chunk_size, MAX_BATCH))
        return reg

    def _over_caps(self, transfer_id: str, reg: _Registration) -> str | None:
        """Why an authenticated connection of ``reg`` may not be served now, or None. Holds the lock."""
        if self._transfers.get(transfer_id) is not reg:
            return "the transfer was unregistered meanwhile"
        if len(reg.channels) >= MAX_PER_TRANSFER:
            return f"this transfer has {MAX_PER_TRANSFER} connections already"
        users = Counter()
        for other in self._transfers.values():
            users[other.who.uid] += len(other.channels)
        if users[reg.who.uid] >= MAX_PER_USER:
            return f"uid {reg.who.uid} has {MAX_PER_USER} connections already"
        return None

    def _session(self, chan: Channel, reg: _Registration) -> None:
        dest = Destination(reg.root, reg.prefix)
        buf = bytearray(RECV_PIECE)
        batch = bytearray()
        try:
            while not self._stopping.is_set():
                try:
                    kind, req, plen = chan.recv()
                except ProtocolError as exc:
                    chan.reply_error(str(exc))
                    return
                if kind == Kind.BYE:
                    return
                try:
                    if kind == Kind.CHUNK:
                        chan.reply(self._chunk(dest, reg, chan, req, plen, memoryview(buf)))
                    elif kind == Kind.BATCH:
                        if plen > MAX_BATCH:
                            raise BadRequest("batch too large")
                        _check_owners(req.files, reg.keep_owners)
                        if len(batch) < plen:
                            batch = bytearray(plen)
                        view = memoryview(batch)[:plen]
                        chan.recv_payload(view)
                        bad, errors = dest.write_batch(req.files, view)
                        chan.reply(f.BatchDone(bad, errors))
                    else:
                        if plen:
                            raise BadRequest(f"{kind.name} carries no payload")
                        chan.reply(self._request(dest, reg, req))
                except (BadRequest, PathEscape, ValueError) as exc:
                    chan.reply_error(f"refused {kind.name}: {exc}")
                    if kind == Kind.CHUNK:  # the sender may still be sending it: let it finish, then read why
                        _drain(chan.sock, plen + TRAILER.size, memoryview(buf))
                    return  # the stream may be out of step now: make the sender reconnect
                except (ConnectionError, TimeoutError):
                    raise
                except OSError as exc:  # e.g. the destination cannot be listed
                    chan.reply_error(f"{kind.name} failed: {exc}")
                    return
                except Exception:  # a bug here must cost this connection, never the mover
                    log.exception("mover request %s failed", kind.name)
                    chan.reply_error(f"{kind.name} failed: internal error in the receiver")
                    return
        finally:
            dest.close()

    def _chunk(self, dest: Destination, reg: _Registration, chan: Channel, req: f.Chunk, plen: int,
               buf: memoryview) -> f.ChunkDone:
        wire_parts(os.fsdecode(req.path))
        chunk_size = _chunk_size(req.chunk_size, self.chunk_size)
        size, index = req.size, req.index
        length = min(chunk_size, size - index * chunk_size)
        if req.extents is not None:  # a sparse file's chunk: only its data extents travel
            try:
                length = sparse.check(req.extents, length)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
        if index + req.holes_after >= chunk_count(size, chunk_size) or plen != length:
            raise BadRequest("chunk index or length does not fit the file size")
        if req.holes_after and req.extents is None:
            raise BadRequest("only a sparse file's chunk says what chunks after it are all hole")
        _check_owners([req], reg.keep_owners)
        owner = None if req.uid is None else (req.uid, req.gid)
        try:
            ok, published = dest.receive_chunk(req, chan, buf, owner)
        except ChunkRefused as exc:  # nothing of the payload read yet: pass it by, the stream goes on
            chan.skip(plen + TRAILER.size, buf)
            return f.ChunkDone(False, False, exc.strerror or str(exc))
        except OSError as exc:
            if isinstance(exc, (ConnectionError, TimeoutError)):
                raise
            raise BadRequest(f"cannot write {os.fsdecode(req.path)!r}: {exc}") from exc
        return f.ChunkDone(ok, published)

    def _request(self, dest: Destination, reg: _Registration, req: f.Frame) -> f.Frame:
        # the fields fit their schema already (decoded by the channel); what is left is this transfer's business
        if isinstance(req, f.Manifest):
            entries, more = dest.manifest_page(req.page)
            return f.ManifestPage(entries, more)
        if isinstance(req, f.Partials):
            for row in req.files:
                _chunk_size(row.chunk_size, self.chunk_size)
            return f.Verified(dest.partials(req.files))
        if isinstance(req, f.Checksums):
            for row in req.files:
                _chunk_size(row.chunk_size, self.chunk_size)
            return f.Digests(dest.checksums(req.files))
        if isinstance(req, f.Mkdirs):
            return f.Done(dest.mkdirs(req.dirs))
        if isinstance(req, f.Delete):
            removed, errors = dest.delete(req.paths)
            return f.Removed(removed, errors)
        if isinstance(req, f.Symlinks):
            return f.Done(dest.symlinks(req.links))
        if isinstance(req, f.FileMeta):
            return f.Done(dest.set_meta(req.files))
        if isinstance(req, f.DirMeta):
            return f.Done(dest.dir_meta(req.dirs))
        if isinstance(req, f.Specials):
            return meta.make_specials(dest, req.entries, devices=reg.keep_owners)
        if isinstance(req, f.HardLinks):
            return meta.hard_links(dest, req.links)
        if isinstance(req, f.XAttrs):
            spaces = tuple(req.namespaces)
            if not reg.keep_owners and any(s.startswith(meta.PRIVILEGED) for s in spaces):
                raise BadRequest("trusted. and security. attributes are kept by root's and operators' syncs only")
            if any(not s for s in spaces):
                raise BadRequest("an empty attribute namespace")
            return meta.set_xattrs(dest, req.entries, spaces)
        if isinstance(req, f.Owners):
            if not reg.keep_owners:
                raise BadRequest("this transfer may not set owners (only root's and operators' syncs do)")
            return f.Done(dest.owners(req.entries))
        raise BadRequest(f"unexpected {f.KINDS[type(req)].name}")


def _check_owners(rows: list, keep_owners: bool) -> None:
    """Rows may carry owners only in transfers that keep them (root's and operators'), and then both."""
    for row in rows:
        if row.uid is not None or row.gid is not None:
            if not keep_owners:
                raise BadRequest("this transfer may not set owners (only root's and operators' syncs do)")
            if row.uid is None or row.gid is None:
                raise BadRequest("a file's owner needs uid and gid")


def _drain(sock: socket.socket, limit: int, scratch: memoryview) -> None:
    """Read and drop what is left of a refused frame (at most ``limit`` bytes) until the peer closes.

    Closing with unread data would reset the connection, and the sender would
    see "connection reset" instead of the ERROR answer (disk full, ...).
    """
    deadline = time.monotonic() + DRAIN_TIMEOUT
    try:
        while limit > 0 and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            n = sock.recv_into(scratch[:min(limit, len(scratch))])
            if n == 0:
                return
            limit -= n
    except OSError:
        pass


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# ---- the mover process: ``python -m cm.transfer.receiver --listen-fd N`` ----
#
# The node daemon writes one JSON control request per line on the mover's
# stdin and reads one ``Answer`` per line on its stdout (``control``).
# End of stdin: stop and exit.

def _control(server: TransferServer, line: bytes) -> Answer:
    try:
        req = decode_control(line)
        if isinstance(req, Register):
            who = Identity(req.uid, req.gid, tuple(req.groups))
            server.register(req.transfer_id, req.token, Path(req.root), req.dst_path, who, req.keep_owners)
        elif isinstance(req, Unregister):
            server.unregister(req.transfer_id)
        return Answer(True)
    except PathEscape as exc:
        return Answer(False, f"destination refused: {exc}")
    except ValueError as exc:
        return Answer(False, f"bad control request: {exc}")
    except OSError as exc:
        return Answer(False, f"destination refused: {exc.strerror or exc}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from cm import logs

    parser = argparse.ArgumentParser(prog="python -m cm.transfer.receiver")
    parser.add_argument("--listen-fd", type=int, required=True, help="a listening TCP socket to serve")
    parser.add_argument("--chunk-size", type=int, default=64 << 20)
    parser.add_argument("--no-encrypt", action="store_true", help="records authenticated only (CM_DATA_ENCRYPT=false)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logs.setup(args.log_level)
    listener = socket.socket(fileno=args.listen_fd)
    host, port = listener.getsockname()[:2]
    server = TransferServer(host, port, chunk_size=args.chunk_size, listener=listener, encrypt=not args.no_encrypt)
    server.start()
    out = sys.stdout.buffer
    out.write(encode_answer(Answer(True, ready=True, pid=os.getpid())))
    out.flush()
    try:
        for line in sys.stdin.buffer:
            if line.strip():
                out.write(encode_answer(_control(server, line)))
                out.flush()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
