"""A warmed-up sender that forks the senders of syncs (``python -m cm.transfer.send --zygote``).

A sender needs about half a second to load numba and its compiled batch reads.
The node daemon keeps one process that has loaded them (the zygote) from its
start; each sync's sender is a fork of it, ready in a millisecond or two and
sharing the loaded code with it (copy-on-write). Without it the first sync on
a node, and every sync that follows another closely, would wait that half
second.

The daemon talks to the zygote over a SOCK_SEQPACKET socket pair (the
zygote's stdin), one datagram per message:

- ``READY`` once the zygote has loaded everything: the daemon forks only
  from then on (before, a sync starts a cold sender rather than wait);
- ``FORK token`` with two descriptors (SCM_RIGHTS): the read end of the new
  sender's stdin and the write end of its stdout. The zygote forks; the child
  starts a session of its own (so stopping the job signals its process group),
  puts the two descriptors on 0 and 1 and goes on as a spare sender does: it
  reads its job (``spec.SpareJob``) on stdin, becomes the job's user, runs.
- ``STARTED token pid`` (or ``FAILED token errno``) answers it;
- ``EXITED pid status`` (a ``waitpid`` status) when a child has ended: the
  zygote is the parent and reaps them, the daemon learns how each ended here.

Only this module knows the layout; the daemon's side is ``cm.node.sync``.
It needs no numba, so the daemon imports it without loading any.
"""

from __future__ import annotations

import array
import errno
import os
import select
import signal
import socket
import struct

READY = b"R"
FORK = struct.Struct("<c8s")  # b"F", token
STARTED = struct.Struct("<c8sq")  # b"S", token, pid
FAILED = struct.Struct("<c8sq")  # b"E", token, errno
EXITED = struct.Struct("<cqq")  # b"X", pid, waitpid status
MAX_MESSAGE = 64


def send_fork(sock: socket.socket, token: bytes, fds: tuple[int, int]) -> None:
    """Ask the zygote for a sender whose stdin and stdout are ``fds``."""
    sock.sendmsg([FORK.pack(b"F", token)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def parse(message: bytes) -> tuple[str, bytes, int, int]:
    """One message of the zygote: ("ready", b"", 0, 0), ("started", token, pid, 0),
    ("failed", token, errno, 0) or ("exited", b"", pid, waitpid status); ValueError for anything else."""
    kind = message[:1]
    if message == READY:
        return "ready", b"", 0, 0
    if kind == b"S" and len(message) == STARTED.size:
        _, token, pid = STARTED.unpack(message)
        return "started", token, pid, 0
    if kind == b"E" and len(message) == FAILED.size:
        _, token, err = FAILED.unpack(message)
        return "failed", token, err, 0
    if kind == b"X" and len(message) == EXITED.size:
        _, pid, status = EXITED.unpack(message)
        return "exited", b"", pid, status
    raise ValueError(f"not a zygote message: {message[:16]!r}")


def serve(control_fd: int) -> bool:
    """The zygote's loop. Returns False when the daemon let it go (its end closed), and True
    in each forked child, which then has its job's pipes on 0 and 1 and runs as a spare sender."""
    ctrl = socket.socket(fileno=os.dup(control_fd))
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, control_fd)  # nothing reads fd 0 by mistake; children put their own pipe there
    os.close(null)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a handler, so the wakeup fd is written
    _send(ctrl, READY)
    while True:
        try:
            ready, _, _ = select.select([ctrl, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
            _reap(ctrl)
        if ctrl not in ready:
            continue
        try:
            message, ancdata, _, _ = ctrl.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(2 * 4))
        except InterruptedError:
            continue
        except OSError:
            return False
        if not message:
            return False  # the daemon is gone or let us go; running children go on by themselves
        fds = _fds_of(ancdata)
        if len(message) != FORK.size or message[:1] != b"F" or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue  # only the daemon holds the other end: a bad message is a bug there, not an attack
        token = FORK.unpack(message)[1]
        settled_r, settled_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (*fds, settled_r, settled_w):
                os.close(fd)
            _send(ctrl, FAILED.pack(b"E", token, exc.errno or errno.EAGAIN))
            continue
        if pid == 0:
            os.close(settled_r)
            _become_child(ctrl, (wake_r, wake_w), fds)
            os.close(settled_w)  # in its own session now: the daemon may signal its group
            return True
        for fd in (*fds, settled_w):
            os.close(fd)
        os.read(settled_r, 1)  # EOF once the child closed its end (or died): the answer names a process group
        os.close(settled_r)
        _send(ctrl, STARTED.pack(b"S", token, pid))


def _fds_of(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def _reap(ctrl: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(ctrl, EXITED.pack(b"X", pid, status))


def _send(ctrl: socket.socket, message: bytes) -> None:
    try:
        ctrl.send(message)
    except OSError:
        pass  # the daemon is gone: the loop sees its end closed


def _become_child(ctrl: socket.socket, wake: tuple[int, int], fds: list[int]) -> None:
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    ctrl.close()
    for fd in wake:
        os.close(fd)
    os.setsid()
    stdin, stdout = fds
    os.dup2(stdin, 0)
    os.dup2(stdout, 1)
    for fd in (stdin, stdout):
        if fd > 2:
            os.close(fd)
