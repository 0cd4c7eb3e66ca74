"""The mover's wire format: where bytes leave and enter its sockets.

Every frame is a 16-byte header, a msgpack map (the frame's fields), and an
optional raw payload (file data) that is never copied into Python objects
larger than a bounded buffer::

    header  = magic "CM" | version u8 | kind u8 | meta_len u32 | payload_len u64
    meta    = msgpack map: the frame's fields, one Struct per kind (``frames``)
    payload = payload_len bytes
    trailer = u64 XXH3-64 of the payload, only for streamed frames (CHUNK)

Frames travel in clear only for the handshake (HELLO, CHALLENGE, AUTH:
``secure``); after it a channel's bytes go in sealed records
(``Channel.secure``), AES-GCM encrypted or only authenticated. The digest
trailer stays either way: it checks the data from the sender's file to the
receiver's.

A sender streams a chunk straight out of a mapped file, hashing each piece
just before it leaves; a receiver reads pieces into one reusable buffer,
hashes them and writes them at their offset in the destination file. A
frame that does not parse, or whose fields do not fit the schema of its
kind, raises ``ProtocolError``; the peer's ERROR answer raises
``RemoteError``.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Callable

from .frames import KINDS, REQUESTS, Error, Frame, FrameError, Kind, decode_answer, decode_request, encode
from .secure import RECORD, Plain, Sealed

MAGIC = b"CM"
VERSION = 7  # 2: manifest rows carry names as bytes only (frames.EntryRow); 3: and owners; 4: batch rows too;
#             5: digests are XXH3-64, not xxh64; 6: challenge-response handshake, then sealed records;
#             7: sparse chunks (extents), special files, hard links, xattrs
HEADER = struct.Struct("<2sBBIQ")
TRAILER = struct.Struct("<Q")
PIECE = RECORD  # bytes handed to the kernel (and the hash, and the cipher) at a time: one record each
MAX_BATCH = 16 << 20  # largest payload of one BATCH frame (many small files)
BUSY = "busy:"  # how a receiver's refusal for its connection caps starts: worth another attempt later


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


class RemoteError(Exception):
    """The peer answered a request with an ERROR frame."""


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and listening (port 0: the kernel picks one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lsock = socket.socket(family, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(128)
    return lsock


def tune(sock: socket.socket) -> None:
    """No Nagle delay (frames are written whole, then waited on) and keepalives.

    Buffer sizes are left to the kernel's autotuning, which beats any fixed
    SO_SNDBUF/SO_RCVBUF on loopback and on fast links alike.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class Channel:
    """One framed, blocking TCP connection. Not thread-safe: one owner at a time.

    ``max_meta`` bounds the msgpack part of incoming frames and
    ``max_payload`` their payload, so a confused or hostile peer cannot make
    us allocate or wait for more than that.
    """

    def __init__(self, sock: socket.socket, max_meta: int = 64 << 20, max_payload: int = 1 << 40):
        self.sock = sock
        self.io: Plain | Sealed = Plain(sock)
        self.max_meta = max_meta
        self.max_payload = max_payload
        self._header = bytearray(HEADER.size)

    def secure(self, sealed: Sealed) -> None:
        """From now on every byte goes in sealed records (after the handshake)."""
        self.io = sealed

    # ---- sending ----

    def send(self, frame: Frame, payload=None, kind: Kind | None = None) -> None:
        """Send one frame (its kind from its type); ``payload`` is any buffer (sent without copying)."""
        body = encode(frame)
        kind = KINDS[type(frame)] if kind is None else kind
        plen = 0 if payload is None else len(payload)
        head = HEADER.pack(MAGIC, VERSION, int(kind), len(body), plen)
        self.io.send([head + body, payload] if plen else [head + body])

    def send_stream(
        self,
        frame: Frame,
        data,
        hasher,
        pace: Callable[[int], None] | None = None,
        sent: Callable[[int, int], None] | None = None,
    ) -> int:
        """Send ``data`` (e.g. a mapped chunk) as a streamed frame with a digest trailer.

        Each piece is folded into ``hasher`` right before it is sent, so the
        bytes are read once while they are hot in cache. ``pace(n)`` is
        called before each piece (bandwidth limit, progress). ``sent(pos, n)``
        is called after each piece has left (e.g. to drop mapped pages, which
        keeps the sender's memory flat). Returns the digest sent.
        """
        view = memoryview(data).cast("B")
        piece = view
        try:
            body = encode(frame)
            self.io.send([HEADER.pack(MAGIC, VERSION, KINDS[type(frame)], len(body), len(view)) + body])
            for pos in range(0, len(view), PIECE):
                piece = view[pos:pos + PIECE]
                hasher.update(piece)
                if pace is not None:
                    pace(len(piece))
                self.io.send([piece])
                piece.release()
                if sent is not None:
                    sent(pos, min(PIECE, len(view) - pos))
        finally:
            piece.release()
            view.release()  # so the caller can close its mapping even after an error
        digest = hasher.digest()
        self.io.send([TRAILER.pack(digest)])
        return digest

    def reply(self, answer: Frame) -> None:
        """Answer the current request with OK and ``answer`` (the Struct ``frames.ANSWERS`` names)."""
        self.send(answer, kind=Kind.OK)

    def reply_error(self, message: str) -> None:
        """Answer the current request with ERROR."""
        self.send(Error(message), kind=Kind.ERROR)

    # ---- receiving ----

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` completely, or raise ``ConnectionError`` (``secure.AuthError`` for a bad record)."""
        self.io.recv_into(view)

    def _recv_frame(self) -> tuple[Kind, bytearray, int]:
        """A frame's header and undecoded fields; the payload (if any) is left to read."""
        self.recv_into(memoryview(self._header))
        magic, version, kind, mlen, plen = HEADER.unpack(self._header)
        if magic != MAGIC:
            raise ProtocolError("bad frame magic")
        if version != VERSION:
            raise ProtocolError(f"protocol version {version}, expected {VERSION}")
        try:
            kind = Kind(kind)
        except ValueError:
            raise ProtocolError(f"unknown frame kind {kind}") from None
        if mlen > self.max_meta:
            raise ProtocolError(f"frame fields too large ({mlen} bytes)")
        if plen > self.max_payload:
            raise ProtocolError(f"frame payload too large ({plen} bytes)")
        raw = bytearray(mlen)
        self.recv_into(memoryview(raw))
        return kind, raw, plen

    def recv(self) -> tuple[Kind, Frame, int]:
        """Read a request's header and fields; the payload (if any) is left to read.

        Returns (kind, fields as the kind's Struct, payload_len). Raises
        ``ProtocolError`` for a malformed frame or one whose fields do not
        fit its kind, and ``ConnectionError`` when the peer goes away.
        """
        kind, raw, plen = self._recv_frame()
        if kind not in REQUESTS:
            raise ProtocolError(f"{kind.name} is not a request")
        try:
            return kind, decode_request(kind, raw), plen
        except FrameError as exc:
            raise ProtocolError(str(exc)) from None

    def recv_payload(self, view: memoryview) -> None:
        """Fill ``view`` with a frame's payload (sent with ``send``: pieces of ``PIECE`` bytes from its start)."""
        for pos in range(0, len(view), PIECE):
            with view[pos:pos + PIECE] as piece:
                self.io.recv_piece(piece)

    def skip(self, n: int, scratch: memoryview) -> None:
        """Read and drop ``n`` payload bytes (after a refused frame)."""
        while n > 0:
            k = min(n, len(scratch))
            self.recv_into(scratch[:k])
            n -= k

    def recv_stream_to_fd(self, fd: int, offset: int, length: int, buf: memoryview, hasher) -> tuple[int, int]:
        """Receive a streamed payload of ``length`` bytes into file ``fd`` at ``offset``.

        Pieces go through ``buf`` (bounded, reused), are hashed and written
        with ``os.pwrite``. Returns (digest computed here, digest the peer sent).
        """
        pos = 0
        step = len(buf)
        while pos < length:
            n = min(step, length - pos)
            piece = buf[:n]
            self.io.recv_piece(piece)
            hasher.update(piece)
            written = 0
            while written < n:
                written += os.pwrite(fd, piece[written:], offset + pos + written)
            pos += n
        trailer = bytearray(TRAILER.size)
        self.recv_into(memoryview(trailer))
        return hasher.digest(), TRAILER.unpack(trailer)[0]

    def request(self, frame: Frame, payload=None) -> Frame:
        """Send a request and wait for its answer; returns the OK fields (see ``frames.ANSWERS``)."""
        self.send(frame, payload)
        return self.answer(KINDS[type(frame)])

    def answer(self, to: Kind) -> Frame:
        """Wait for the OK/ERROR answer to the last request, of kind ``to``."""
        kind, raw, plen = self._recv_frame()
        if plen:
            raise ProtocolError("answers carry no payload")
        if kind not in (Kind.OK, Kind.ERROR):
            raise ProtocolError(f"expected an answer, got {kind.name}")
        try:
            fields = decode_answer(to, kind == Kind.OK, raw)
        except FrameError as exc:
            raise ProtocolError(str(exc)) from None
        if kind == Kind.ERROR:
            raise RemoteError(fields.message)
        return fields

    def close(self) -> None:
        """Close the socket (idempotent)."""
        try:
            self.sock.close()
        except OSError:
            pass
