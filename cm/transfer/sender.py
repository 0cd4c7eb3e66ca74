"""The sending end of the mover: one per source node of a sync job.

``Sender.run`` walks the source, asks the destination what it has, works
out this rank's share and what of it the destination lacks (``decide``),
makes the structure (deletions, directories, symlinks, metadata), then
streams the data over several connections (``streams``): chunks of large
files straight out of a mapped file, small files packed into batches.
Progress goes to ``emit`` a few times a second.

The parts, one module each: ``connection`` (connect, HELLO, paged
requests), ``decide`` (the diff decision and resume), ``streams`` (the work
queue and the stream threads), ``source`` (reading files and batches),
``throttle`` (``--bwlimit``), ``stats`` (counters and the report).
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path
from typing import Callable

from . import diff
from . import frames as f
from .connection import Connections, TransferError, request_pages
from .decide import Work, decide
from .paths import PathEscape, confine
from .source import Source
from .spec import Spec
from .stats import Stats
from .streams import Streams, WorkQueue
from .throttle import Throttle
from .excludes import Excluder
from .tree import FILE, Entry, walk
from .wire import Channel, ProtocolError, RemoteError

PROGRESS_EVERY = 0.25  # seconds between progress lines

__all__ = ["Sender", "TransferError", "warm_up"]


def warm_up() -> None:
    """Load numba and the compiled code a sender runs (batch reads)."""
    from . import batchio

    batchio.warm_up_reading()


def _owner_differs(e: Entry, d: Entry | None) -> bool:
    """Whether the destination's copy of ``e`` (left in place) needs its owner set."""
    return d is None or (d.uid, d.gid) != (e.uid, e.gid)


class Sender:
    """Runs one rank of a sync job described by a ``Spec``.

    ``channel`` is the class of its connections (tests pass one that spoils
    bytes on the wire, to see them caught and sent again).
    """

    def __init__(self, spec: Spec, emit: Callable[[dict], None], channel: type[Channel] = Channel):
        self.spec = spec
        self.emit = emit
        self.stats = Stats()
        self.excluder = Excluder(spec.exclude)
        self.connections = Connections(spec, channel)
        self.source: Source | None = None

    def run(self) -> dict:
        """Do the whole transfer for this rank; returns the final report."""
        spec = self.spec
        started = time.monotonic()
        try:
            top = confine(Path(spec.src_root), spec.src_path)
        except PathEscape as exc:
            raise TransferError(f"source path refused: {exc}") from exc
        try:
            st = os.lstat(top)
        except FileNotFoundError:
            raise TransferError(f"source {spec.src_path!r} does not exist") from None
        single_file = stat.S_ISREG(st.st_mode)
        self.source = Source(top.parent if single_file else top, self.stats)
        control = self.connections.connect()
        try:
            # the receiver walks the destination while we walk the source
            control.send(f.Manifest(0))
            entries = walk(top, self.excluder)
            src = {e.path: e for e in entries}
            dst_list = self.excluder.prune(self._manifest(control))  # excludes are matched here, not in the mover
            dst = {e.path: e for e in dst_list}
            work = decide(spec, control, entries, dst, self.source, self.stats)
            lead = spec.rank == 0
            tops, gone = diff.deletions(src, dst_list) if lead and spec.delete and not single_file else ([], [])
            mkdirs = diff.dirs_to_make(entries, dst)
            links = diff.links_to_make(entries, dst) if lead else []
            if spec.dry_run:
                would = [f"delete {p}" for p in gone] + [f"send {e.path}/" for e in mkdirs if lead and e.path] + \
                    [f"send {e.path}" for e in links] + work.would
                self.stats.files_deleted = len(gone)
                return self.stats.report(time.monotonic() - started, would=would)
            if work.chunks or work.small:
                threading.Thread(target=warm_up, name="warm-up", daemon=True).start()  # while directories are made
            touched = self._structure(control, tops, gone, mkdirs, links, work.meta)
            self._move_data(control, work)
            touched.update(diff.parent(it.entry.path) for it in work.chunks + work.small)
            dirs = diff.dir_meta(entries, dst, touched)
            self._pages(control, f.DirMeta, [f.MetaRow(os.fsencode(e.path), e.mode, e.mtime_ns)
                                             for e in reversed(dirs)])
            if spec.owners:  # root's and operators' syncs: each rank its own files, the lead the rest
                # files whose data went (batches, chunks) were created with their owner already
                owned = work.owned + ([e for e in entries if e.kind != FILE] if lead else [])
                sent = {it.entry.path for it in work.small} | {it.entry.path for it in work.chunks}
                made = {e.path for e in mkdirs} | {e.path for e in links}
                owned = [e for e in owned if e.path not in sent
                         and (e.path in made or _owner_differs(e, dst.get(e.path)))]
                self._pages(control, f.Owners, [f.OwnerRow(*row) for row in self.source.owner_rows(owned)])
            control.send(f.Bye())
        except (ConnectionError, TimeoutError) as exc:
            raise TransferError(f"lost the receiver at {spec.dst_host}:{spec.dst_port}: {exc}", transient=True) from exc
        except (ProtocolError, RemoteError) as exc:
            raise TransferError(f"transfer to {spec.dst_host}:{spec.dst_port} failed: {exc}") from exc
        except OSError as exc:  # reading the source tree
            raise TransferError(f"cannot read the source: {exc}") from exc
        finally:
            self.connections.close()
        return self.stats.report(time.monotonic() - started)

    def _pages(self, chan: Channel, make, rows: list) -> list:
        return request_pages(chan, make, rows, self.stats)

    def _manifest(self, chan: Channel) -> list[Entry]:
        """The destination's entries; the request for the first page has already been sent."""
        entries: list[Entry] = []
        page = 0
        while True:
            if page:
                chan.send(f.Manifest(page))
            ans = chan.answer(f.Kind.MANIFEST)
            entries.extend(map(Entry.from_wire, ans.entries))
            if not ans.more:
                return entries
            page += 1

    def _structure(self, chan: Channel, tops, gone, mkdirs, links, meta) -> set[str]:
        """Deletions, directories, symlinks and metadata-only updates, before any file data."""
        touched: set[str] = set()
        if tops:
            self._pages(chan, f.Delete, [os.fsencode(p) for p in tops])
            self.stats.files_deleted = len(gone)
            touched.update(diff.parent(p) for p in tops)
        if mkdirs:
            self._pages(chan, f.Mkdirs, [f.DirRow(os.fsencode(e.path), e.mode) for e in mkdirs])
            touched.update(diff.parent(e.path) for e in mkdirs if e.path)
            touched.update(e.path for e in mkdirs)
        if links:
            self._pages(chan, f.Symlinks, [f.LinkRow(os.fsencode(e.path), os.fsencode(e.target), e.mtime_ns)
                                           for e in links])
            touched.update(diff.parent(e.path) for e in links)
            self.stats.files_sent += len(links)
        if meta:
            self._pages(chan, f.FileMeta, [f.MetaRow(os.fsencode(e.path), e.mode, e.mtime_ns) for e in meta])
        return touched

    def _move_data(self, control: Channel, work: Work) -> None:
        queue = WorkQueue(work)
        if not len(queue):
            return
        pace = Throttle(self.spec.bwlimit) if self.spec.bwlimit else None
        streams = Streams(self.spec, self.source, self.stats, work, queue, pace)
        nstreams = min(self.spec.streams, len(queue))
        channels = [control]
        for _ in range(nstreams - 1):
            try:
                channels.append(self.connections.connect())
            except TransferError as exc:
                if not exc.transient:
                    raise
                break  # the receiver is busy (its caps) or hard to reach: go on with the streams we have
        threads = [threading.Thread(target=streams.stream, args=(ch,), name=f"stream-{i}", daemon=True)
                   for i, ch in enumerate(channels)]
        started = time.monotonic()
        for t in threads:
            t.start()
        last = None
        next_line = started
        while alive := [t for t in threads if t.is_alive()]:
            alive[0].join(max(next_line - time.monotonic(), 0.01))
            if time.monotonic() >= next_line:
                last = self._progress(started, last)
                next_line = time.monotonic() + PROGRESS_EVERY
        self._progress(started, last)
        if queue.fatal is not None:
            raise queue.fatal

    def _progress(self, started: float, last: tuple | None) -> tuple:
        s = self.stats
        now = (min(s.bytes_done, s.bytes_total), s.files_done)
        if now != last:
            elapsed = max(time.monotonic() - started, 1e-6)
            rate = now[0] / elapsed
            eta = (s.bytes_total - now[0]) / rate if rate > 0 else None
            self.emit({"bytes_done": now[0], "bytes_total": s.bytes_total, "files_done": now[1],
                       "files_total": s.files_total, "rate": round(rate), "eta": None if eta is None else round(eta, 1)})
        return now
