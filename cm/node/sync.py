"""A node's share of a sync job: a sender process on the source side,
a registration with this node's mover on the destination side.

A sender spends about half a second loading numba and its compiled
checksums before it can send anything, which is most of the time a sync of
a few thousand small files takes. So the node keeps ``sender_spares``
senders started ahead of need (``python -m cm.transfer.send --spare``),
from its first sync as a source on: each loads everything, then waits for
its job on stdin, takes on the job's user and error log, and runs. A job
that finds no spare starts one there and then, and waits that half second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from cm.creds import Identity, acting_as
from cm.node.launch import LaunchError, job_identity, log_paths, make_log_dir
from cm.protocol import DestinationTransfer, SourceTransfer, SyncSource


def data_identity(transfer: SourceTransfer | DestinationTransfer, who: Identity) -> Identity:
    """Who a sync reads and writes its data as: root for root's and operators' syncs, which keep
    owners (the head sets ``owners``), otherwise the job's user."""
    return Identity(0, 0, ()) if transfer.owners else who


def _sender_env() -> dict:
    # Not the daemon's CM_* settings: the sender runs as the user, who could read them from
    # /proc (CM_OPERATOR_TOKEN grants admin rights).
    return {k: v for k, v in os.environ.items() if k.startswith(("NUMBA_", "PATH", "HOME", "LANG", "LC_"))}


class Spares:
    """Sender processes started ahead of need, waiting for a job on stdin.

    ``fill`` starts spares up to ``count`` once this node has run a sender
    (a node that never is a source keeps none): the agent calls it when no
    sender is running, so a spare's start-up never competes with a transfer.
    A spare whose stdin closes (the daemon went away) exits at once.
    """

    RETRY_AFTER = 30.0  # seconds before replacing a spare that died idle (it may die again)

    def __init__(self, count: int):
        self.count = max(count, 0)
        self._ready: list[subprocess.Popen] = []
        self._not_before = 0.0
        self._wanted = False

    def fill(self) -> None:
        """Start spares up to ``count`` (none before the first ``take``)."""
        if not self._wanted:
            return
        alive = [p for p in self._ready if p.poll() is None]
        if len(alive) < len(self._ready):
            for p in self._ready:
                if p.returncode is not None:
                    _discard(p)
            self._not_before = time.monotonic() + self.RETRY_AFTER
        self._ready = alive
        while len(self._ready) < self.count and time.monotonic() >= self._not_before:
            try:
                self._ready.append(_start_sender_process())
            except OSError:
                self._not_before = time.monotonic() + self.RETRY_AFTER

    def take(self) -> subprocess.Popen:
        """A sender waiting for its job: a spare if one is alive, else one started now."""
        self._wanted = True
        while self._ready:
            proc = self._ready.pop(0)
            if proc.poll() is None:
                return proc
            _discard(proc)
        return _start_sender_process()

    def close(self) -> None:
        """Let every spare go: each exits when its stdin closes."""
        for proc in self._ready:
            _discard(proc)
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._ready = []


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
                 spares: Spares | None = None) -> tuple[subprocess.Popen, Path]:
    """Hand this rank's transfer to a sender running as the user; progress comes back on its stdout."""
    who = job_identity(spec)
    transfer = sender_spec(spec.transfer, data_root)
    _, err_path = log_paths(spec, node, job_id, spec.rank, cwd=Path(spec.cwd or "/"))
    try:
        make_log_dir(err_path.parent, who)
        with acting_as(who):  # made by the user, where the user may write, never through a planted link
            os.close(os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
    except (LaunchError, OSError):
        err_path = Path(os.devnull)
    reader = data_identity(spec.transfer, who)
    job = {"transfer": transfer, "uid": reader.uid, "gid": reader.gid, "groups": list(reader.groups),
           "stderr": str(err_path)}
    data = msgspec.json.encode(job)
    for attempt in range(2):
        try:
            proc = spares.take() if spares is not None and attempt == 0 else _start_sender_process()
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
