"""A sender's counters, shared by its stream threads, and the final report made of them."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import msgspec

from cm.protocol import SyncStats


@dataclass
class Stats:
    """Counters shared by the stream threads."""

    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    bytes_sent: int = 0
    files_sent: int = 0
    files_deleted: int = 0
    files_skipped: int = 0
    chunks_resent: int = 0
    chunks_resumed: int = 0
    partial_bytes: int = 0  # verified chunks of files not published yet: kept at the destination for resuming
    errors: list = field(default_factory=list)
    vanished: int = 0  # of the errors: source files that vanished or kept changing while read (rsync's 24)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _failed: set = field(default_factory=set, repr=False)
    moved: set = field(default_factory=set, repr=False)  # paths of the source files that vanished or changed
    skipped: list = field(default_factory=list)  # (path, reason) of what was not copied
    on_path: Callable[..., None] | None = field(default=None, repr=False)  # report.Report.add: failed, skipped

    def add(self, **counts: int) -> None:
        """Add to several counters at once."""
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def error(self, path: str, message: str, vanished: bool = False) -> None:
        """Record a failure for one path; the transfer goes on. ``vanished``: the source file is gone,
        or kept changing while it was read (the tree moved under the sync; nothing could be done)."""
        with self.lock:
            if path in self._failed:
                return  # one file, one error (its other chunks fail for the same reason)
            self._failed.add(path)
            self.errors.append(f"{path or '.'}: {message}")
            self.vanished += vanished
            if vanished:
                self.moved.add(path)
        if self.on_path is not None:
            self.on_path("failed", path, reason=message)

    def failed(self, path: str) -> bool:
        """Whether a failure has been recorded for ``path``."""
        with self.lock:
            return path in self._failed

    def skip(self, path: str, reason: str) -> None:
        """Record something not copied (a device in a user's sync, an xattr the destination refuses)."""
        with self.lock:
            self.skipped.append((path, reason))
        if self.on_path is not None:
            self.on_path("skipped", path, reason=reason)

    def report(self, elapsed: float, would: list[str] | None = None) -> dict:
        """The sender's last line: what was done (``would``: what a dry run would do)."""
        final = SyncStats(bytes_sent=self.bytes_sent, files_sent=self.files_sent, files_deleted=self.files_deleted,
                          files_skipped=self.files_skipped, chunks_resent=self.chunks_resent,
                          chunks_resumed=self.chunks_resumed, bytes_total=self.bytes_total,
                          files_total=self.files_total, errors=len(self.errors), vanished=self.vanished,
                          partial_bytes=self.partial_bytes, skipped=len(self.skipped), elapsed=round(elapsed, 3))
        report = {"done": True, **msgspec.structs.asdict(final)}
        if would is not None:
            report["would"] = would
        return report
