"""The node's mover process, seen from the node daemon: start it, tell it transfers, restart it.

The receiving end of syncs (``cm.transfer.receiver``) runs in a process of
its own, as root, so that whatever happens to it (a crash in compiled
code, a bug in a request handler) cannot take the node daemon down. The
daemon binds the listening socket once and hands it to each mover it
starts, so the port that nodes were told stays the same across restarts.
``check`` (called by the daemon's supervisor a few times a second) starts a
new mover when the old one died and registers again every transfer that
was registered; senders that lost their connection end with the
"try again" exit code, and the head restarts the sync.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from cm.creds import Identity
from cm.logs import event
from cm.transfer.control import Answer, Register, Request, Unregister, decode_answer, encode_request
from cm.transfer.wire import listen  # not the receiver: the daemon never loads numba

log = logging.getLogger("cm.node.mover")
ANSWER_TIMEOUT = 30.0  # seconds the mover may take to answer a control request (it loads numba at start)


class MoverError(RuntimeError):
    """The mover refused a request or could not be reached; the message is for the user."""


class Mover:
    """A supervised ``python -m cm.transfer.receiver`` child process and its registrations."""

    def __init__(self, host: str, port: int, chunk_size: int, log_level: str = "INFO", encrypt: bool = True):
        self.listener = listen(host, port)
        self.port = self.listener.getsockname()[1]
        self.chunk_size = chunk_size
        self.log_level = log_level
        self.encrypt = encrypt  # CM_DATA_ENCRYPT: records encrypted, or only authenticated
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._lock = threading.Lock()
        self._registered: dict[str, Register] = {}
        self._not_before = 0.0

    # ---- lifecycle ----

    def start(self) -> None:
        """Start the mover process and wait until it serves."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cm.transfer.receiver", "--listen-fd", str(self.listener.fileno()),
             "--chunk-size", str(self.chunk_size), "--log-level", self.log_level]
            + ([] if self.encrypt else ["--no-encrypt"]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=[self.listener.fileno()], cwd="/", env=env)
        self.starts += 1
        ready = self._read_answer()
        event(log, "mover started", pid=ready.pid, port=self.port, starts=self.starts)
        for req in list(self._registered.values()):
            answer = self._ask(req)
            if not answer.ok:
                event(log, "transfer not registered again", logging.WARNING, transfer=req.transfer_id,
                      error=answer.error)

    def check(self) -> None:
        """Start a new mover if the running one died (at most every few seconds)."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                return
            if time.monotonic() < self._not_before:
                return
            if self.proc is not None:
                event(log, "mover died; starting it again", logging.ERROR, exit_code=self.proc.returncode,
                      transfers=len(self._registered))
                self._close_pipes()
            self._not_before = time.monotonic() + 2.0
            try:
                self._start()
            except (OSError, MoverError) as exc:
                event(log, "cannot start the mover", logging.ERROR, error=str(exc))

    def stop(self) -> None:
        """Stop the mover: it exits when its stdin closes; killed if it does not within 5 s."""
        with self._lock:
            proc, self.proc = self.proc, None
            if proc is not None:
                self._close_pipes(proc)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.listener.close()

    def _close_pipes(self, proc: subprocess.Popen | None = None) -> None:
        proc = proc or self.proc
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        """Whether a mover process runs now (False while a dead one waits to be started again)."""
        return self.proc is not None and self.proc.poll() is None

    # ---- transfers ----

    def register(self, transfer_id: str, token: str, root: Path, dst_path: str, who: Identity,
                 keep_owners: bool = False) -> None:
        """Let senders proving they hold the run's key (``token``) write under root/dst_path as ``who``;
        raises MoverError. The token goes to the mover over its stdin, never on the network."""
        req = Register(transfer_id, token, str(root), dst_path, who.uid, who.gid, list(who.groups), keep_owners)
        with self._lock:
            answer = self._ask(req)
            if not answer.ok:
                raise MoverError(answer.error or "the mover refused the transfer")
            self._registered[transfer_id] = req

    def unregister(self, transfer_id: str) -> None:
        """Forget a transfer and drop its connections (idempotent)."""
        with self._lock:
            if self._registered.pop(transfer_id, None) is not None:
                try:
                    self._ask(Unregister(transfer_id))
                except MoverError as exc:  # a dead mover has forgotten it already
                    event(log, "unregister failed", logging.WARNING, transfer=transfer_id, error=str(exc))

    def _ask(self, req: Request) -> Answer:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            raise MoverError("this node's mover is not running (it is being restarted)")
        try:
            proc.stdin.write(encode_request(req))
            proc.stdin.flush()
        except OSError as exc:
            raise MoverError(f"this node's mover went away: {exc}") from None
        return self._read_answer()

    def _read_answer(self) -> Answer:
        proc = self.proc
        fd = proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], ANSWER_TIMEOUT)
        line = proc.stdout.readline() if ready else b""
        if not line:
            proc.kill()
            raise MoverError("this node's mover did not answer")
        try:
            return decode_answer(line)
        except ValueError:
            proc.kill()
            raise MoverError("this node's mover answered garbage") from None
