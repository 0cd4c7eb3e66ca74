"""The mover's data-plane security: a handshake on the run's key, then sealed records.

No secret crosses the wire. The sender and the destination's mover both
know the run's key (``run_key``: the token the head gave each of them over
the CurveZMQ control plane). A connection starts in clear::

    sender → HELLO      transfer_id, sender nonce (32 random bytes)
    mover  → CHALLENGE  mover nonce, encrypt flag, proof_m
    sender → AUTH       proof_s
    mover  → WELCOME    (the first sealed record)

``proof_m`` = HMAC-SHA256(k_auth, "mover" ‖ transcript) shows the sender it
talks to the destination (only it was given the key); ``proof_s`` =
HMAC-SHA256(k_auth, "sender" ‖ transcript) shows the mover the sender holds
the key. The transcript names the protocol version, the transfer and both
nonces and the encrypt flag, so a proof is good for this one connection
only, and the flag cannot be changed on the way. The keys come from
HKDF-SHA256 over the run's key with the transcript: ``k_auth`` for the
proofs and one key per direction, fresh for every connection.

Everything after AUTH travels in records::

    record = length u32 | body (length bytes) | tag (16 bytes)

sealed with AES-256-GCM under the direction's key, the nonce being the
count of records sent so far in that direction. With encryption on (the
default), the body is the ciphertext; with it off (``CM_DATA_ENCRYPT=false``,
for a fabric the site trusts) the body is the plaintext and the tag is the
GCM tag over it as associated data (GMAC). Either way a record altered,
dropped, replayed or put out of order fails its tag and ends the
connection, and a record of another connection is sealed under other keys.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE_BYTES = 32  # each side's random contribution to a connection's keys
PROOF_BYTES = 32  # HMAC-SHA256
TAG = 16  # AES-GCM tag
RECORD = 1 << 20  # largest record body: one piece of a chunk (``wire.PIECE``)
LENGTH = struct.Struct("<I")
_MAX_RECORDS = 1 << 64  # the counter is the nonce: it must never repeat under one key


class AuthError(ConnectionError):
    """The peer failed the handshake (wrong key, or not the peer it claims to be) or a record failed its tag.

    A ``ConnectionError``: the connection is dropped as if lost, and a sender tries again.
    """


def run_key(token: str) -> bytes:
    """The run's key as the node side holds it (the token the head derived for this run).

    The one place where the data plane turns what the head gave into key
    material: the head's way of deriving a run's token may change, this
    stays.
    """
    if not token:
        raise ValueError("a transfer needs a key")
    return hashlib.sha256(b"cm-mover run key\0" + token.encode()).digest()


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def transcript(version: int, transfer_id: str, sender_nonce: bytes, mover_nonce: bytes, encrypt: bool) -> bytes:
    """What both proofs and the connection's keys are bound to."""
    tid = transfer_id.encode()
    return b"".join([b"cm-mover\0", bytes([version]), LENGTH.pack(len(tid)), tid, sender_nonce, mover_nonce,
                     b"\1" if encrypt else b"\0"])


class Session:
    """One connection's keys, from the run's key and the transcript (both ends compute the same)."""

    def __init__(self, key: bytes, script: bytes):
        okm = HKDF(hashes.SHA256(), 96, salt=None, info=b"cm-mover session\0" + script).derive(key)
        self.script = script
        self.encrypt = script[-1] == 1
        self._auth, self.to_mover, self.to_sender = okm[:32], okm[32:64], okm[64:]

    def proof(self, role: str) -> bytes:
        """``role`` ("mover" or "sender") proves it holds the run's key."""
        return hmac.new(self._auth, role.encode() + b"\0" + self.script, "sha256").digest()

    def check(self, role: str, proof: bytes) -> None:
        """Raises ``AuthError`` unless ``proof`` is ``role``'s."""
        if not hmac.compare_digest(self.proof(role), proof):
            raise AuthError(f"the {role} failed to prove it holds the transfer's key")

    def records(self, sock: socket.socket, side: str) -> "Sealed":
        """The sealed transport for ``side`` ("mover" or "sender") of this connection."""
        out, into = (self.to_sender, self.to_mover) if side == "mover" else (self.to_mover, self.to_sender)
        return Sealed(sock, out, into, self.encrypt)


class Plain:
    """The socket as it is: only the handshake travels so. ``deadline`` (monotonic) bounds it as a whole."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline: float | None = None

    def send(self, bufs: list) -> None:
        _sendmsg_all(self.sock, bufs)

    def recv_into(self, view: memoryview) -> None:
        got, n = 0, len(view)
        while got < n:
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the peer took too long to authenticate")
                self.sock.settimeout(left)
            r = self.sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
            if r == 0:
                raise ConnectionError("peer closed the connection")
            got += r

    recv_piece = recv_into


class Sealed:
    """Records in both directions, AES-256-GCM with a counter nonce; encrypted or only authenticated."""

    def __init__(self, sock: socket.socket, send_key: bytes, recv_key: bytes, encrypt: bool):
        self.sock = sock
        self.encrypt = encrypt
        self._tx, self._rx = AESGCM(send_key), AESGCM(recv_key)
        self._sent = self._received = 0
        self._out = bytearray()  # ciphertext being sent (encrypt mode), grown on demand
        self._in = bytearray()  # ciphertext received (encrypt mode)
        self._plain = bytearray()  # plaintext of a record longer than what was asked for
        self._pending = memoryview(b"")
        self._len = bytearray(LENGTH.size)
        self._tag = bytearray(TAG)

    # ---- sending ----

    def send(self, bufs: list) -> None:
        """Each buffer goes as records of at most ``RECORD`` bytes (a record never spans two buffers)."""
        for b in bufs:
            with memoryview(b) as raw, raw.cast("B") as view:  # released even when sending fails: the
                for pos in range(0, len(view), RECORD):       # caller may have to close a mapping under them
                    with view[pos:pos + RECORD] as piece:
                        self._send_record(piece)

    def _nonce(self, n: int) -> bytes:
        if n >= _MAX_RECORDS:
            raise AuthError("too many records on one connection")
        return n.to_bytes(12, "big")

    def _send_record(self, piece: memoryview) -> None:
        n = len(piece)
        nonce = self._nonce(self._sent)
        self._sent += 1
        if self.encrypt:
            if len(self._out) < n + TAG:
                self._out = bytearray(max(n + TAG, 4096))
            sealed = memoryview(self._out)[:n + TAG]
            self._tx.encrypt_into(nonce, piece, None, sealed)
            _sendmsg_all(self.sock, [LENGTH.pack(n), sealed])
        else:
            tag = self._tx.encrypt(nonce, b"", piece)
            _sendmsg_all(self.sock, [LENGTH.pack(n), piece, tag])

    # ---- receiving ----

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` with the plaintext that comes next; raises ``AuthError`` for a record that fails its tag."""
        pos, want = 0, len(view)
        while pos < want:
            if self._pending:
                k = min(len(self._pending), want - pos)
                view[pos:pos + k] = self._pending[:k]
                self._pending = self._pending[k:]
                pos += k
                continue
            self._fill([memoryview(self._len)])
            (n,) = LENGTH.unpack(self._len)
            if n > RECORD:
                raise AuthError(f"record of {n} bytes is above {RECORD}")
            if n <= want - pos:  # straight into the caller's buffer
                self._open(n, view[pos:pos + n])
                pos += n
            else:
                if len(self._plain) < n:
                    self._plain = bytearray(max(n, 4096))
                dest = memoryview(self._plain)[:n]
                self._open(n, dest)
                self._pending = dest

    def recv_piece(self, view: memoryview) -> None:
        """Fill ``view`` with the next record, sent as one piece of exactly ``len(view)`` bytes (the pieces of a
        streamed payload: ``wire.PIECE`` each, the last one shorter); one system call for length, body and tag."""
        n = len(view)
        if self._pending or n > RECORD or n == 0:
            return self.recv_into(view)
        self._open(n, view, with_length=True)

    def _open(self, n: int, dest: memoryview, with_length: bool = False) -> None:
        """Receive the body (and tag) of a record of ``n`` bytes into ``dest``, and check it; ``with_length``:
        its length too, which must be ``n``."""
        nonce = self._nonce(self._received)
        self._received += 1
        head = [memoryview(self._len)] if with_length else []
        try:
            if self.encrypt:
                if len(self._in) < n + TAG:
                    self._in = bytearray(max(n + TAG, 4096))
                with memoryview(self._in) as whole, whole[:n + TAG] as sealed:
                    self._fill(head + [sealed])
                    self._check_length(n, with_length)
                    self._rx.decrypt_into(nonce, sealed, None, dest)
            else:
                self._fill(head + [dest, memoryview(self._tag)])
                self._check_length(n, with_length)
                self._rx.decrypt(nonce, bytes(self._tag), dest)
        except InvalidTag:
            raise AuthError("a record failed its check (altered, replayed or out of order)") from None

    def _check_length(self, n: int, given: bool) -> None:
        if given and LENGTH.unpack(self._len)[0] != n:
            raise AuthError(f"a record of {LENGTH.unpack(self._len)[0]} bytes where one of {n} was due")

    def _fill(self, views: list) -> None:
        """Fill every view, in order (one ``recvmsg_into`` while the data are there)."""
        views = [v for v in views if len(v)]
        made = []
        try:
            while views:
                got = self.sock.recvmsg_into(views, 0, socket.MSG_WAITALL)[0]
                if got == 0:
                    raise ConnectionError("peer closed the connection")
                while views and got >= len(views[0]):
                    got -= len(views[0])
                    views.pop(0)
                if views and got:
                    views[0] = views[0][got:]
                    made.append(views[0])
        finally:
            for v in made:
                v.release()


def _sendmsg_all(sock: socket.socket, bufs: list) -> None:
    """Send every buffer, in order, without copying them; every view made of them is released at the end."""
    made = [memoryview(b) for b in bufs]
    try:
        views = [v.cast("B") if v.format != "B" or v.ndim != 1 else v for v in made]
        made += views
        while views:
            sent = sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]
                made.append(views[0])
    finally:
        for v in reversed(made):
            v.release()
