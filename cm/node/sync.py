"""A node's share of a sync job: a sender process on the source side,
a registration with this node's mover on the destination side.

A sender spends about half a second loading numba and its compiled batch
code before it can send anything, which is most of the time a sync of
a few thousand small files takes. So the node keeps one sender loaded from
the daemon's start on (``warm_sender``), the zygote
(``cm.transfer.zygote``), and forks each sync's senders from it: the first
sync on a new cluster, syncs that follow each other closely and the ranks of
a parallel sync all start warm. The zygote costs ~130 MB (its unique set
size); its forks share its loaded code. Each fork reads its job on stdin,
takes on the job's user and error log, and runs. Without a zygote (it
failed, or ``warm_sender`` is off) a sender starts cold.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from cm.creds import Identity, acting_as
from cm.logs import event
from cm.node.launch import LaunchError, job_identity, log_paths, make_log_dir
from cm.node.purge import pid_alive
from cm.protocol import DestinationTransfer, SourceTransfer, SyncSource
from cm.states import JobState
from cm.transfer import exitcodes, zygote
from cm.transfer.report import report_path


log = logging.getLogger("cm.node")

def data_identity(transfer: SourceTransfer | DestinationTransfer, who: Identity) -> Identity:
    """Who a sync reads and writes its data as: root for root's and operators' syncs, which keep
    owners (the head sets ``owners``), otherwise the job's user."""
    return Identity(0, 0, ()) if transfer.owners else who


def _sender_env() -> dict:
    # Not the daemon's CM_* settings: the sender runs as the user, who could read them from
    # /proc (CM_OPERATOR_TOKEN grants admin rights).
    return {k: v for k, v in os.environ.items() if k.startswith(("NUMBA_", "PATH", "HOME", "LANG", "LC_"))}


class ForkedSender:
    """A sender forked by the zygote, with the part of ``subprocess.Popen`` the node uses
    (pid, stdin, stdout, poll, wait, kill). The zygote is its parent and tells how it ended."""

    def __init__(self, pid: int, stdin, stdout, senders: "WarmSenders"):
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.returncode: int | None = None
        self._senders = senders

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._senders.exit_of(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"sender {self.pid}", timeout or 0)
            self._senders.wait_readable(0.05)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class WarmSenders:
    """The node's zygote: a sender loaded once, from which each sync's senders are forked.

    The node starts it before it says hello to the head and says hello only
    once it is ready (``settled``; at most ``READY_WAIT`` seconds, the time numba
    may take to compile on a fresh install): a node the head schedules on starts
    its first sync as fast as any other (an extra ~0.6 s at the daemon's start,
    against ~0.7 s on that first sync).

    ``take`` gives a sender waiting for its job: forked from the zygote once it
    has said it is ready (it is started again, at most every ``RETRY_AFTER``
    seconds, if it died), else started cold: the node's loop never waits for a
    zygote that is still loading. ``fileno`` is for the node's poller: the zygote
    writes there when a child ended, and ``collect`` reads it.
    """

    RETRY_AFTER = 30.0  # seconds before starting again a zygote that died (it may die again)
    ANSWER_TIMEOUT = 1.0  # seconds a ready zygote may take to answer a fork (the node's loop waits)
    READY_WAIT = 20.0  # seconds a node holds its registration for a loading zygote (numba may be compiling)

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.exits: dict[int, int] = {}  # pid -> returncode, as Popen gives it
        self.children: set[int] = set()
        self.ready = False  # the zygote has loaded everything and answers forks at once
        self._not_before = 0.0
        self._started_at = 0.0
        self._tokens = 0

    def start(self) -> None:
        """Start the zygote (from the daemon's start on, so no sync waits for it to load)."""
        if self.sock is not None and not self.alive():
            self.collect()  # what it said before it died: a death while loading holds restarts off
        if not self.enabled or self.alive() or time.monotonic() < self._not_before:
            return
        self._let_go()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "cm.transfer.send", "--zygote"], stdin=theirs,
                                         stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                                         cwd="/", env=_sender_env())
        except OSError:
            ours.close()
            self._not_before = time.monotonic() + self.RETRY_AFTER
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self.ready = False
        if not self._started_at:  # READY_WAIT runs from the first start: restarts do not prolong it
            self._started_at = time.monotonic()

    def settled(self) -> bool:
        """Whether a sync started now gets a sender as fast as it ever will: the zygote is ready,
        off, failed, or has been loading for longer than READY_WAIT (syncs start cold until it is). The
        node's loop collects the zygote's "ready" when its socket is readable."""
        return (not self.enabled or self.ready or not self.alive()
                or time.monotonic() - self._started_at >= self.READY_WAIT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def fileno(self) -> int | None:
        return self.sock.fileno() if self.sock is not None else None

    def take(self) -> subprocess.Popen | ForkedSender:
        """A sender waiting for its job on stdin: forked from the zygote if one is ready, else started cold."""
        if self.sock is not None and not self.ready:
            self.collect()
        if self.sock is not None and self.ready and self.alive():
            try:
                return self._fork()
            except OSError:
                self._not_before = time.monotonic() + self.RETRY_AFTER
                self._let_go()  # it does not answer as it should: a cold sender now, a new zygote later
        return _start_sender_process()

    def _fork(self) -> ForkedSender:
        assert self.sock is not None
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        self._tokens += 1
        token = self._tokens.to_bytes(8, "little")
        try:
            zygote.send_fork(self.sock, token, (in_r, out_w))
            pid = self._answer(token)
        except BaseException:
            for fd in (in_w, out_r):
                os.close(fd)
            raise
        finally:
            os.close(in_r)
            os.close(out_w)
        self.children.add(pid)
        return ForkedSender(pid, os.fdopen(in_w, "wb"), os.fdopen(out_r, "rb", buffering=0), self)

    def _answer(self, token: bytes) -> int:
        deadline = time.monotonic() + self.ANSWER_TIMEOUT
        while True:
            for kind, got, value in self.collect():
                if got != token:
                    continue
                if kind == "started":
                    return value
                raise OSError(value, f"the zygote could not fork: {os.strerror(value)}")
            left = deadline - time.monotonic()
            if left <= 0 or not self.alive():
                raise OSError("the zygote did not answer")
            self.wait_readable(min(left, 0.05))

    def wait_readable(self, timeout: float) -> None:
        if self.sock is not None:
            select.select([self.sock], [], [], timeout)
        else:
            time.sleep(timeout)

    def collect(self) -> list[tuple[str, bytes, int]]:
        """Read what the zygote said; record exits; return the other answers (kind, token, value)."""
        answers = []
        while self.sock is not None:
            try:
                message = self.sock.recv(zygote.MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                message = b""
            if not message:  # the zygote is gone
                if not self.ready:  # it died loading (numba, an import): not again at once, and not in a loop
                    self._not_before = time.monotonic() + self.RETRY_AFTER
                self._let_go()
                break
            try:
                kind, token, value, status = zygote.parse(message)
            except ValueError:
                continue
            if kind == "ready":
                self.ready = True
                event(log, "sender zygote ready", pid=self.proc.pid if self.proc else None)
            elif kind == "exited":
                self.children.discard(value)
                self.exits[value] = os.waitstatus_to_exitcode(status)
            else:
                answers.append((kind, token, value))
        return answers

    def exit_of(self, pid: int) -> int | None:
        """How a forked sender ended, or None while it runs."""
        if pid not in self.exits:
            self.collect()
        if pid in self.exits:
            return self.exits.pop(pid)
        if self.sock is None and pid in self.children and not pid_alive(pid):
            self.children.discard(pid)  # its zygote died before telling: worth another attempt
            return exitcodes.TRANSIENT
        return None

    def _let_go(self) -> None:
        self.ready = False
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None

    def close(self) -> None:
        """Let the zygote go: it exits when its end closes; running senders go on to their end."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def _start_sender_process() -> subprocess.Popen:
    # Own session, so stopping the job signals its whole process group. stderr is the
    # daemon's until the sender opens the job's error log.
    return subprocess.Popen([sys.executable, "-m", "cm.transfer.send", "--spare"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, start_new_session=True, close_fds=True, cwd="/",
                            env=_sender_env())


def _discard(proc: subprocess.Popen) -> None:
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass


def sender_spec(transfer: SourceTransfer, data_root: str) -> dict:
    """The sender's spec (cm.transfer.spec.Spec) for this rank's transfer under this node's data root."""
    spec = msgspec.structs.asdict(transfer)
    if spec.pop("transport") != "tcp":
        from cm.transfer.rdma import missing

        raise LaunchError(f"--transport {transfer.transport} is not available on this node: "
                          f"{missing() or 'this sender speaks TCP only'}")
    return {**spec, "src_root": data_root}


def start_sender(spec: SyncSource, node: str, job_id: int, data_root: str,
                 warm: WarmSenders | None = None) -> tuple[subprocess.Popen | ForkedSender, Path]:
    """Hand this rank's transfer to a sender running as the user; progress comes back on its stdout."""
    who = job_identity(spec)
    transfer = sender_spec(spec.transfer, data_root)
    _, err_path = log_paths(spec, node, job_id, spec.rank, cwd=Path(spec.cwd or "/"))
    try:
        make_log_dir(err_path.parent, who)
        with acting_as(who):  # made by the user, where the user may write, never through a planted link
            _touch(err_path, os.O_APPEND)
    except (LaunchError, OSError):
        err_path = Path(os.devnull)
    report = report_path(Path(spec.cwd or "/"), job_id, spec.rank)
    try:
        with acting_as(who):  # the user's file, in the user's cmlogs/, as the error log
            _touch(report, os.O_TRUNC)
    except OSError:
        report = None
    reader = data_identity(spec.transfer, who)
    job = {"transfer": transfer, "uid": reader.uid, "gid": reader.gid, "groups": list(reader.groups),
           "stderr": str(err_path), "report": str(report) if report else None}
    data = msgspec.json.encode(job)
    for attempt in range(2):
        try:
            proc = warm.take() if warm is not None and attempt == 0 else _start_sender_process()
        except OSError as exc:
            raise LaunchError(f"cannot start the sender on {node}: {exc}") from None
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(data)
            proc.stdin.close()
            break
        except OSError as exc:  # it died before its job: take a fresh one
            proc.kill()
            proc.wait()
            _discard(proc)
            if attempt:
                raise LaunchError(f"the sender on {node} exited before its job: {exc}") from None
    os.set_blocking(proc.stdout.fileno(), False)
    return proc, err_path


def _touch(path: Path, flags: int) -> None:
    """Make the regular file ``path`` for the sender (as the job's user, who may have planted something
    there: never through a link, never waiting on a fifo, OSError for anything but a regular file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | flags, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
    finally:
        os.close(fd)


def sender_end(state: JobState, exit_code: int, reason: str, err_path: Path) -> tuple[JobState, str]:
    """A sender's share as it ended: its state and reason, from its exit code and error log.

    A share stopped on purpose keeps the reason it was stopped with. Exit code 24
    (``exitcodes.VANISHED``: all copied but source files that vanished or kept
    changing) is COMPLETED; a sender killed by a signal nobody here sent (the
    kernel's OOM killer: 9) says so in its reason (it had no chance to write why).
    """
    if reason or state != JobState.FAILED:
        return state, reason
    said = last_line(err_path)
    if exit_code == exitcodes.VANISHED:
        return JobState.COMPLETED, said
    if exit_code > 128:
        signum = exit_code - 128
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        why = f"sender killed by signal {signum} ({name}{': out of memory?' if signum == signal.SIGKILL else ''})"
        return state, why + (f"; its last message: {said}" if said else "")
    return state, said


def last_line(path: Path, limit: int = 4096) -> str:
    """The last non-empty line of a (small) error log, for the job's reason."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""
