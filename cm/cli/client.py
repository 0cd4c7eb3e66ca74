"""The commands' link to the head: one request, one reply, over the head's Unix socket.

Requests and replies are the protocol's msgpack maps (cm.protocol's Request and Reply), made and read with
the msgpack library: a command imports neither msgspec nor cm.protocol nor cm.config, which together cost
every command ~25 ms. The head validates each request against its schema as it would any other.
"""

from __future__ import annotations

import _socket  # the socket module's Python layer (its enums) costs a command ~3 ms; a client needs none of it
import os
import sys

import msgpack

from cm.api.views import exit_code_of, is_final
from cm.config_sources import ConfigError, find_head_socket
from cm.framing import MAX_FRAME, frame, unframe

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a command ~10 ms
    from typing import Any, NoReturn

VERSION = 3  # cm.protocol.VERSION; tests/test_pure.py checks it and that the head reads the requests


class HeadError(RuntimeError):
    """The head refused the request or could not be reached; the message is for the user, ``code``
    (a cm.protocol.ErrorCode's value, None when the head was not reached) for programs."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class HeadUnreachable(HeadError):
    """The link to the head failed (not there, closed, silent): a head that restarts looks like this."""


RECONNECT_FOR = 300.0  # seconds a waiting command keeps trying to reach a head that went away (a restart)


class Client:
    """``settings`` (a cm.config.Settings) says where the head is; by default the socket and run_dir
    settings alone do (cm.config_sources.find_head_socket)."""

    def __init__(self, settings=None, timeout: float = 30.0):
        self.path = str(settings.socket_path) if settings is not None else find_head_socket()
        self.timeout = timeout
        self.sock: _socket.socket | None = None

    def _connect(self) -> _socket.socket:
        if self.sock is None:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except OSError as exc:
                sock.close()
                raise HeadUnreachable(
                    f"cannot reach the head at {self.path}: {exc.strerror or exc} "
                    "(is the cluster up? `make local-up`, then `. drive/run/cm.env`)"
                ) from None
            self.sock = sock
        return self.sock

    def call(self, op: str, **args: Any) -> Any:
        """Send one request (cm.protocol's of type ``op``, with these fields); return its data or raise
        HeadError with the head's message."""
        try:
            reply = self._exchange(msgpack.packb({**args, "t": op, "v": VERSION}))
        except HeadError:
            self.close()  # a link that failed once is not used again
            raise
        if not reply["ok"]:
            raise HeadError(reply.get("error") or "refused", reply.get("code"))
        return reply.get("data")

    def submit(self, **job: Any) -> Any:
        """Submit a job (the fields of cm.protocol's SubmitCommand or SubmitSync, ``kind`` among them)."""
        return self.call("submit", job=job)

    def _exchange(self, body: bytes) -> dict:
        """One framed request out, one reply in; every way the link can fail is a HeadError."""
        sock = self._connect()
        try:
            sock.sendall(frame(body))
            buffer = bytearray()
            while (got := unframe(buffer, MAX_FRAME)) is None:  # FrameTooBig is a ValueError
                data = sock.recv(1 << 20)
                if not data:
                    raise HeadUnreachable("the head closed the connection")
                buffer += data
            reply = msgpack.unpackb(got, strict_map_key=False)
        except TimeoutError:
            raise HeadUnreachable(f"the head did not answer within {self.timeout:.0f} s") from None
        except OSError as exc:
            raise HeadUnreachable(f"lost the connection to the head: {exc}") from None
        except (ValueError, msgpack.UnpackException) as exc:  # ExtraData and FormatError are ValueErrors
            raise HeadError(f"garbled reply from the head: {exc}") from None
        if not isinstance(reply, dict) or reply.get("t") != "reply" or not isinstance(reply.get("ok"), bool):
            raise HeadError(f"unexpected reply from the head: {str(reply)[:200]}")
        if reply.get("v") != VERSION:
            raise HeadError(f"the head speaks protocol version {reply.get('v')!r}, this command {VERSION}")
        return reply

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def wait(self, job_id: int, on_update=None, patience: float = RECONNECT_FOR) -> dict:
        """Wait until the job is final; return its view.

        The head answers a waiting client the moment the job ends (a long
        poll), so nothing is lost to a polling interval. With ``on_update``
        (a progress bar) each poll lasts at most half a second and
        on_update(view) is called after each. A head that goes away (a
        restart) or waits for its database is asked again, for up to
        ``patience`` seconds without an answer: the job goes on without it.
        """
        import time

        timeout = 0.5 if on_update else min(20.0, max(self.timeout - 5.0, 1.0))
        lost_since = None
        while True:
            try:
                view = self.call("wait", job_id=job_id, timeout=timeout)["jobs"][0]
            except HeadError as exc:
                if not isinstance(exc, HeadUnreachable) and exc.code != "db_unavailable":
                    raise
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since > patience:
                    raise HeadError(f"{exc}; no answer about job {job_id} for {patience:.0f} s", exc.code) from None
                time.sleep(0.5)
                continue
            lost_since = None
            if on_update:
                on_update(view)
            if is_final(view):
                return view


__all__ = ["Client", "HeadError", "HeadUnreachable", "exit_code_of", "fail", "notify_args", "parse_labels",
           "run_command"]


def parse_labels(pairs: tuple[str, ...]) -> dict[str, str]:
    """--label KEY=VALUE (repeatable) -> {KEY: VALUE}; the head checks keys and values."""
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise HeadError(f"--label {pair!r} must look like KEY=VALUE")
        labels[key] = value
    return labels


def notify_args(urls: tuple[str, ...], on: str) -> dict:
    """--notify URL (repeatable) and --notify-on begin,end,fail as a submission's fields (the head checks them)."""
    events = [e.strip() for e in on.split(",") if e.strip()]
    return {"notify": list(urls), "notify_on": events} if urls or events else {}


def fail(prog: str, message: str, code: int = 1) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def run_command(prog: str, body) -> None:
    """Run body(); turn every expected failure into one line on stderr, never a traceback."""
    try:
        body()
    except HeadError as exc:
        fail(prog, str(exc))
    except ConfigError as exc:
        fail(prog, str(exc), 2)
    except KeyboardInterrupt:
        fail(prog, "interrupted", 130)
    except BrokenPipeError:
        os._exit(1)
