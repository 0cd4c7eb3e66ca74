"""The per-file report of a sync: one JSON line per path created, updated, deleted, skipped or failed.

Each rank of a sync writes its own file, ``cmlogs/<job>/files-<rank>.jsonl``
under the job's working directory, made by the node as the job's user
(``cm.node.sync``) and written by the sender as it goes. A line::

    {"action": "created", "path": "a/b.txt", "kind": "f", "size": 12, "xxh3": "9f0c..."}

``action`` is ``created``, ``updated``, ``deleted``, ``skipped`` or
``failed``; skipped and failed lines have a ``reason``; a file whose data
was sent has its XXH3-64 (``xxh3``, hex; a file sent in chunks:
``chunks_xxh3``, one per chunk this rank sent, and ``chunks_resumed``, the
chunks an earlier run had verified already); a hard link has ``link``, its
first name. A dry run writes the same lines with ``"dry_run": true``: what
would be done. Paths that are not UTF-8 keep their bytes as
surrogate escapes (``\\udcff``), which Python's ``json`` reads back as they
were written.

``read`` pages through a job's report: the ranks' files one after another.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from pathlib import Path

ACTIONS = ("created", "updated", "deleted", "skipped", "failed")
MAX_PAGE = 10_000  # lines in one page
MAX_LINE = 16 << 20  # bytes of one line the head reads (800,000 chunks' digests: a 50 TB file in 64 MiB chunks)


def file_name(rank: int) -> str:
    return f"files-{rank}.jsonl"


def report_path(cwd: str | os.PathLike, job_id: int, rank: int) -> Path:
    """Where rank ``rank`` of job ``job_id`` writes its report."""
    return Path(cwd) / "cmlogs" / str(job_id) / file_name(rank)


class Report:
    """A rank's report, written line by line (``fd`` None: a sync without one writes nothing)."""

    def __init__(self, fd: int | None = None, dry_run: bool = False):
        self.fd = fd
        self.dry_run = dry_run
        self.existing: dict = {}  # the destination's entries by path, as listed: created or updated
        self.lines = 0
        self._lock = threading.Lock()
        self._buf: list[str] = []

    def __bool__(self) -> bool:
        return self.fd is not None

    def add(self, action: str, path: str, **fields) -> None:
        """One line (``fields``: kind, size, xxh3, reason, link, ...; None values are left out)."""
        if self.fd is None:
            return
        line = {"action": action, "path": path or "."}
        line.update((k, v) for k, v in fields.items() if v is not None)
        if self.dry_run:
            line["dry_run"] = True
        text = json.dumps(line, ensure_ascii=True)
        with self._lock:
            self._buf.append(text)
            self.lines += 1
            if len(self._buf) >= 512:
                self._flush()

    def made(self, path: str, kind: str, **fields) -> None:
        """A line for something put in place: created, or updated when the destination had that path."""
        self.add("updated" if path in self.existing else "created", path, kind=kind, **fields)

    def close(self) -> None:
        """Write what is left and close the file."""
        if self.fd is None:
            return
        with self._lock:
            self._flush()
        os.close(self.fd)
        self.fd = None

    def _flush(self) -> None:
        if not self._buf:
            return
        data = ("\n".join(self._buf) + "\n").encode()
        self._buf = []
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]


def digest_hex(digest: int) -> str:
    return f"{digest:016x}"


def read(directory: Path, nranks: int, offset: int = 0, limit: int = 1000,
         action: str | None = None) -> tuple[list[dict], int | None]:
    """Lines ``offset`` on (``limit`` at most, only ``action``'s if given) of a job's report in ``directory``.

    Returns (lines, the offset of the next page or None at the end). Raises OSError for a report
    that cannot be read (FileNotFoundError: none was written), or that is not a regular file. The files
    are the job's user's: a line longer than ``MAX_LINE`` is an unreadable line, never read whole.
    """
    limit = max(1, min(limit, MAX_PAGE))
    out: list[dict] = []
    index = 0
    found = False
    for rank in range(nranks):
        try:  # without blocking: a fifo put there would hold the reader (the head's loop) up
            fd = os.open(directory / file_name(rank), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            continue
        found = True
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, f"{file_name(rank)} is not a regular file")
            while raw := f.readline(MAX_LINE):
                if len(raw) == MAX_LINE and not raw.endswith(b"\n"):
                    raw = b"{"  # unreadable; the rest of it is passed over a piece at a time
                    while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass
                if not raw.strip():
                    continue
                if action is not None and f'"action": "{action}"'.encode() not in raw:
                    continue
                if index >= offset:
                    if len(out) == limit:
                        return out, index
                    try:
                        out.append(json.loads(raw))
                    except ValueError:
                        out.append({"action": "failed", "path": "?", "reason": "an unreadable report line"})
                index += 1
    if not found:
        raise FileNotFoundError(f"no report in {directory}")
    return out, None
