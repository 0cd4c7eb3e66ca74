"""A sender's connections to the destination's receiver: connect, authenticate (``secure``), request in pages."""

from __future__ import annotations

import os
import socket
from typing import Callable

from . import frames as f
from . import secure
from .spec import Spec
from .stats import Stats
from .wire import BUSY, VERSION, Channel, ProtocolError, RemoteError, tune

CONNECT_TIMEOUT = 30.0
IO_TIMEOUT = 600.0
LIST_PAGE = 5000  # rows per structure request


class TransferError(Exception):
    """The transfer cannot go on (destination unreachable, refused, protocol broken).

    `transient` marks a failure of the network or of the receiving node, which
    a new attempt may not meet; a refusal or a broken protocol is not.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class Connections:
    """Opens authenticated channels to one transfer's receiver and closes them all at the end.

    ``channel`` is the class of the channels made (tests pass one that
    spoils bytes on the wire).
    """

    def __init__(self, spec: Spec, channel: type[Channel] = Channel):
        self.spec = spec
        self.channel = channel
        self.open: list[Channel] = []

    def connect(self) -> Channel:
        """A new connection that has said HELLO; raises ``TransferError``."""
        spec = self.spec
        try:
            sock = socket.create_connection((spec.dst_host, spec.dst_port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            raise TransferError(f"cannot reach the receiver at {spec.dst_host}:{spec.dst_port}: {exc}",
                                transient=True) from exc
        tune(sock)
        sock.settimeout(IO_TIMEOUT)
        chan = self.channel(sock)
        self.open.append(chan)
        try:
            welcome = handshake(chan, spec.transfer_id, spec.token)
        except RemoteError as exc:
            busy = str(exc).startswith(BUSY)  # the receiver's caps: another attempt later may get in
            raise TransferError(f"the receiver refused the transfer: {exc}", transient=busy) from exc
        except secure.AuthError as exc:  # our key is not the run's, or the peer is not the destination
            raise TransferError(f"the receiver refused the transfer: authentication failed: {exc}") from exc
        except (ConnectionError, TimeoutError, OSError) as exc:  # lost, or cut off by a flood of others
            raise TransferError(f"lost the receiver at {spec.dst_host}:{spec.dst_port} while authenticating: "
                                f"{exc}", transient=True) from exc
        except ProtocolError as exc:
            raise TransferError(f"the receiver at {spec.dst_host}:{spec.dst_port} broke the handshake: {exc}") \
                from exc
        if spec.chunk_size > welcome.max_chunk:
            raise TransferError(f"chunk size {spec.chunk_size} exceeds the receiver's {welcome.max_chunk}")
        return chan

    def close(self) -> None:
        """Close every channel opened (idempotent)."""
        for chan in self.open:
            chan.close()


def handshake(chan: Channel, transfer_id: str, token: str) -> f.Welcome:
    """Prove to the mover that we hold the run's key and check that it does; then seal the channel.

    Raises ``secure.AuthError`` when the mover cannot prove it is the
    destination, ``RemoteError`` when it refuses us.
    """
    mine = secure.new_nonce()
    challenge = chan.request(f.Hello(transfer_id, mine))
    session = secure.Session(secure.run_key(token),
                             secure.transcript(VERSION, transfer_id, mine, challenge.nonce, challenge.encrypt))
    session.check("mover", challenge.proof)
    chan.send(f.Auth(session.proof("sender")))
    chan.secure(session.records(chan.sock, "sender"))
    return chan.answer(f.Kind.AUTH)


def request_pages(chan: Channel, make: Callable[[list], f.Frame], rows: list, stats: Stats,
                  answer: str | None = None) -> list:
    """Send ``rows`` as requests of ``LIST_PAGE`` rows each (``make(rows)`` builds one).

    Failures the receiver reports per path go to ``stats``; returns the
    concatenated ``answer`` field of the answers (if named).
    """
    out: list = []
    for i in range(0, len(rows), LIST_PAGE):
        ans = chan.request(make(rows[i:i + LIST_PAGE]))
        for err in getattr(ans, "errors", ()):
            stats.error(os.fsdecode(err.path), err.message)
        if answer:
            out.extend(getattr(ans, answer))
    return out
