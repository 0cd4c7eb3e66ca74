"""The commands' link to the head: one request, one reply, over the head's Unix socket."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, NoReturn

from cm import config
from cm.api.views import FINAL, exit_code_of, is_final
from cm.protocol import ErrorCode, ProtocolError, Reply, Request, decode, frame, unframe


class HeadError(RuntimeError):
    """The head refused the request or could not be reached; the message is for the user, ``code``
    (a cm.protocol.ErrorCode, None when the head was not reached) for programs."""

    def __init__(self, message: str, code: ErrorCode | None = None):
        super().__init__(message)
        self.code = code


class Client:
    def __init__(self, settings: config.Settings | None = None, timeout: float = 30.0):
        self.settings = settings or config.load()
        self.timeout = timeout
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self.sock is None:
            path = self.settings.socket_path
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(path))
            except OSError as exc:
                sock.close()
                raise HeadError(
                    f"cannot reach the head at {path}: {exc.strerror or exc} "
                    "(is the cluster up? `make local-up`, then `. drive/run/cm.env`)"
                ) from None
            self.sock = sock
        return self.sock

    def call(self, op: str, **args: Any) -> Any:
        """Send one request; return its data or raise HeadError with the head's message."""
        sock = self._connect()
        try:
            sock.sendall(frame(Request(op=op, args=args)))
            buffer = bytearray()
            while True:
                body = unframe(buffer)
                if body is not None:
                    break
                data = sock.recv(1 << 20)
                if not data:
                    raise HeadError("the head closed the connection")
                buffer += data
            reply = decode(body)
        except socket.timeout:
            self.close()
            raise HeadError(f"the head did not answer within {self.timeout:.0f} s") from None
        except OSError as exc:
            self.close()
            raise HeadError(f"lost the connection to the head: {exc}") from None
        except ProtocolError as exc:
            self.close()
            raise HeadError(f"garbled reply from the head: {exc}") from None
        if not isinstance(reply, Reply):
            raise HeadError(f"unexpected {reply.TYPE} from the head")
        if not reply.ok:
            raise HeadError(reply.error, reply.code)
        return reply.data

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def wait(self, job_id: int, on_update=None) -> dict:
        """Wait until the job is final; return its view.

        The head answers a waiting client the moment the job ends (a long
        poll), so nothing is lost to a polling interval. With ``on_update``
        (a progress bar) each poll lasts at most half a second and
        on_update(view) is called after each.
        """
        timeout = 0.5 if on_update else min(20.0, max(self.timeout - 5.0, 1.0))
        while True:
            view = self.call("wait", job_id=job_id, timeout=timeout)["jobs"][0]
            if on_update:
                on_update(view)
            if is_final(view):
                return view


__all__ = ["FINAL", "Client", "HeadError", "exit_code_of", "fail", "main_of", "parse_labels", "run_command"]


def parse_labels(pairs: tuple[str, ...]) -> dict[str, str]:
    """--label KEY=VALUE (repeatable) -> {KEY: VALUE}; the head checks keys and values."""
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise HeadError(f"--label {pair!r} must look like KEY=VALUE")
        labels[key] = value
    return labels


def fail(prog: str, message: str, code: int = 1) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def main_of(cli, prog: str) -> NoReturn:
    """Run a click command as the process's entry point and leave without the interpreter's
    teardown (a few ms of every command's run: nothing is left to clean up once output is flushed)."""
    try:
        cli(prog_name=prog)
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader went away (`cminfo | head`)
        code = code or 1
    os._exit(code)


def run_command(prog: str, body) -> None:
    """Run body(); turn every expected failure into one line on stderr, never a traceback."""
    try:
        body()
    except HeadError as exc:
        fail(prog, str(exc))
    except config.ConfigError as exc:
        fail(prog, str(exc), 2)
    except KeyboardInterrupt:
        fail(prog, "interrupted", 130)
    except BrokenPipeError:
        os._exit(1)
