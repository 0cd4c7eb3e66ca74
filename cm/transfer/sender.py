"""The sending end of the mover: one per source node of a sync job.

``Sender.run`` walks the source, asks the destination what it has, works
out this rank's share and what of it the destination lacks (``decide``),
makes the structure (deletions, directories, symlinks, metadata), then
streams the data over several connections (``streams``): chunks of large
files read a piece at a time as they are sent, small files packed into batches.
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

import msgspec

from cm.protocol import SyncCounters

from . import diff, meta, sparse
from . import frames as f
from .connection import LIST_PAGE, Connections, TransferError, request_pages
from .decide import Work, decide
from .partial import chunk_count, partial_names
from .paths import PathEscape, confine
from .report import Report
from .source import Source
from .spec import Spec
from .stats import Stats
from .streams import Streams, WorkQueue
from .throttle import Throttle
from .excludes import Excluder
from .tree import DEVICES, FILE, Entry, walk
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
    bytes on the wire, to see them caught and sent again). ``report`` gets
    a line per path this rank changed, skipped or failed (``report``).
    """

    def __init__(self, spec: Spec, emit: Callable[[dict], None], channel: type[Channel] = Channel,
                 report: Report | None = None):
        self.spec = spec
        self.emit = emit
        self.report = report or Report()
        self.report.dry_run = spec.dry_run
        self.stats = Stats(on_path=self.report.add)
        self.excluder = Excluder(spec.exclude)
        self.connections = Connections(spec, channel)
        self.source: Source | None = None
        self.work: Work | None = None
        self.resumed: dict[str, int] = {}  # chunks of each file verified by an earlier run
        self.hole_runs: dict[tuple[str, int], int] = {}  # (path, index): all-hole chunks sent with that one

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
        try:
            return self._run(top, single_file, started)
        finally:
            self.report.close()

    def _run(self, top: Path, single_file: bool, started: float) -> dict:
        spec, report = self.spec, self.report
        control = self.connections.connect()
        try:
            # the receiver walks the destination while we walk the source
            control.send(f.Manifest(0))
            inodes: dict | None = {} if spec.hard_links else None
            unreadable: list[tuple[str, str]] = []
            listed: dict | None = {} if meta.namespaces(spec.xattrs, spec.acls, spec.owners) else None
            # cm's own temporaries are never data to copy
            entries = walk(top, self.excluder, skip_temp=True, inodes=inodes, unreadable=unreadable, xattrs=listed)
            for path, why in unreadable if spec.rank == 0 else ():  # every rank walks: the lead says it
                self.stats.error(path, f"cannot be read ({why}): what is in it was not copied")
            kept = self._kept(entries, inodes, listed)
            # excludes are matched here, not in the mover; then the mover's temporaries are set apart
            dst_list, temps = diff.split_temps(self.excluder.prune(self._manifest(control)))
            dst = {e.path: e for e in dst_list}
            report.existing = dst
            data = [e for e in entries if e.path not in kept.followers] if kept.followers else entries
            work = self.work = decide(spec, control, data, dst, self.source, self.stats, kept.pinned)
            if work.chunks:  # chunks of sparse files that are all hole go with the chunk before them
                work.chunks, self.hole_runs = sparse.hole_runs(work.chunks, self._hole_chunks)
                for (path, _), n in self.hole_runs.items():
                    work.remaining[path] -= n
            lead = spec.rank == 0
            tops, gone = diff.deletions({e.path: e for e in entries}, dst_list) \
                if lead and spec.delete and not single_file else ([], [])
            # what no run will resume: another version's, a vanished file's
            orphans = diff.orphan_temps(entries, dst, temps, spec.chunk_size, spec.checksum) \
                if lead and temps and not spec.dry_run and not single_file else []
            if orphans:
                self._pages(control, f.Delete, [os.fsencode(p) for p in orphans])
            mkdirs = diff.dirs_to_make(entries, dst)
            links = diff.links_to_make(entries, dst) if lead else []
            specials = self._specials(entries, dst) if lead else []
            if spec.dry_run:
                new_links = [(leader, p) for leader, p in kept.links_of(spec.rank) if p not in dst]
                would = [f"delete {p}" for p in gone] + [f"send {e.path}/" for e in mkdirs if lead and e.path] + \
                    [f"send {e.path}" for e in links + specials] + work.would + \
                    [f"link {p} => {leader}" for leader, p in new_links]
                self.stats.files_deleted = len(gone)
                self._report_structure(gone, mkdirs if lead else [], links, specials, range(len(specials)))
                for it in work.small + [it for it in work.chunks if it.first]:
                    report.made(it.entry.path, FILE, size=it.entry.size)
                for leader, p in new_links:
                    report.made(p, FILE, link=leader)
                return self.stats.report(time.monotonic() - started, would=would)
            if work.chunks or work.small:
                threading.Thread(target=warm_up, name="warm-up", daemon=True).start()  # while directories are made
            # every directory this rank writes into is in ``touched``: its mode and mtime are set again after
            # this rank's last write there (another rank may have set them before, see ``destination``)
            touched = self._structure(control, tops, gone, mkdirs, links, work.meta)
            touched.update(diff.parent(p) for p in orphans)
            made_specials: list[int] = []
            if specials:
                made_specials = self._apply(control, f.Specials, [
                    f.SpecialRow(os.fsencode(e.path), e.kind, e.mode, e.mtime_ns, e.size) for e in specials])
                touched.update(diff.parent(e.path) for e in specials)
            self._report_structure(gone, mkdirs if lead else [], links, specials, made_specials)
            for e in work.meta:
                report.add("updated", e.path, kind=FILE, what="mode, mtime")
            if spec.nranks == 1:  # chunks an earlier run verified, per file (a rank sees only its own share)
                left = work.remaining
                self.resumed = {e.path: chunk_count(e.size, spec.chunk_size) - left[e.path]
                                for e in {it.entry.path: it.entry for it in work.chunks}.values()}
            self._move_data(control, work)
            self._drop_partials(control, work.given_up(self.stats.moved))
            touched.update(diff.parent(it.entry.path) for it in work.chunks + work.small)
            hard = self._linkable(kept.links_of(spec.rank))
            if hard:  # after the data: their files are in place
                linked = self._apply(control, f.HardLinks, [f.HardLinkRow(os.fsencode(p), os.fsencode(leader))
                                                            for leader, p in hard])
                touched.update(diff.parent(p) for _, p in hard)
                for i in linked:
                    report.made(hard[i][1], FILE, link=hard[i][0])
            dirs = diff.dir_meta(entries, dst, touched)
            self._pages(control, f.DirMeta, [f.MetaRow(os.fsencode(e.path), e.mode, e.mtime_ns)
                                             for e in reversed(dirs)])
            if spec.owners:  # root's and operators' syncs: each rank its own files, the lead the rest
                # files whose data went (batches, chunks) were created with their owner already
                owned = work.owned + ([e for e in entries if e.kind != FILE] if lead else [])
                sent = {it.entry.path for it in work.small} | {it.entry.path for it in work.chunks}
                made = {e.path for e in mkdirs} | {e.path for e in links} | {e.path for e in specials}
                owned = [e for e in owned if e.path not in sent
                         and (e.path in made or _owner_differs(e, dst.get(e.path)))]
                self._pages(control, f.Owners, [f.OwnerRow(*row) for row in self.source.owner_rows(owned)])
            if kept.spaces:  # last: a change of owner may drop some (security.capability)
                sent_items = work.small + work.chunks
                rows = kept.xattr_rows(entries, spec.rank, sent_items, mkdirs if lead else [])
                if rows:
                    changed = self._apply(control, lambda page: f.XAttrs(list(kept.spaces), page), rows)
                    reported = {it.entry.path for it in sent_items} | {e.path for e in mkdirs}
                    for i in changed:
                        path = os.fsdecode(rows[i].path)
                        if path not in reported:
                            report.add("updated", path, what="xattrs")
            control.send(f.Bye())
        except (ConnectionError, TimeoutError) as exc:
            raise TransferError(f"lost the receiver at {spec.dst_host}:{spec.dst_port}: {exc}", transient=True) from exc
        except (ProtocolError, RemoteError) as exc:
            raise TransferError(f"transfer to {spec.dst_host}:{spec.dst_port} failed: {exc}") from exc
        except OSError as exc:  # reading the source tree
            raise TransferError(f"cannot read the source: {exc}") from exc
        finally:
            self.connections.close()
            self.stats.partial_bytes = self.work.partial_bytes() if self.work is not None else 0
        return self.stats.report(time.monotonic() - started)

    def _drop_partials(self, chan: Channel, files: list[Entry]) -> None:
        """Remove what was received of files that vanished or changed: no run will resume that version."""
        paths = []
        for e in files:
            folder, _, name = e.path.rpartition("/")
            paths += [os.fsencode(f"{folder}/{t}" if folder else t)
                      for t in partial_names(name, e.size, e.mtime_ns, self.spec.chunk_size)]
            self.work.verified[e.path] = 0
        self._pages(chan, f.Delete, paths)

    def _pages(self, chan: Channel, make, rows: list) -> list:
        return request_pages(chan, make, rows, self.stats)

    def _report_structure(self, gone: list[str], mkdirs: list[Entry], links: list[Entry], specials: list[Entry],
                          made_specials) -> None:
        report = self.report
        if not report:
            return
        for p in gone:
            report.add("deleted", p)
        for e in mkdirs:
            if e.path:
                report.made(e.path, e.kind)
        for e in links:
            report.made(e.path, e.kind, target=e.target)
        for i in made_specials:
            report.made(specials[i].path, specials[i].kind)

    def _apply(self, chan: Channel, make, rows: list) -> list[int]:
        """Requests answered by ``frames.Applied``; what the destination skipped is counted with its reason.
        Returns the indices of the rows that changed something."""
        changed: list[int] = []
        for i in range(0, len(rows), LIST_PAGE):
            ans = chan.request(make(rows[i:i + LIST_PAGE]))
            for err in ans.errors:
                self.stats.error(os.fsdecode(err.path), err.message)
            for skip in ans.skipped:
                self.stats.skip(os.fsdecode(skip.path), skip.message)
            changed.extend(i + k for k in ans.changed)
        return changed

    def _kept(self, entries: list[Entry], inodes: dict | None, listed: dict | None) -> "meta.Kept":
        spec = self.spec
        spaces = meta.namespaces(spec.xattrs, spec.acls, spec.owners)
        attrs = meta.read_xattrs(self.source.top, entries, listed, spaces, spec.owners, self.stats.skip) \
            if listed else {}
        return meta.Kept(spaces, attrs, meta.link_groups(inodes) if inodes else {}, spec.nranks, entries)

    def _linkable(self, links: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The (first name, other name) pairs to link: not those whose first name failed to copy (the
        destination may still hold that name's old data, which the other name must not take on)."""
        out = []
        for leader, p in links:
            if self.stats.failed(leader):
                self.stats.error(p, f"not linked: its other name {leader!r} could not be copied",
                                 vanished=leader in self.stats.moved)
            else:
                out.append((leader, p))
        return out

    def _hole_chunks(self, e: Entry) -> set[int]:
        """The chunks of a file that are hole from end to end (none for a file without holes)."""
        handles = self.source.handles(capacity=4)
        try:
            fd = self.source.open(handles, e)
        except (OSError, PathEscape):
            return set()  # its chunks will say why
        finally:
            handles.close()
        try:
            return sparse.hole_chunks(fd, e.size, self.spec.chunk_size) if sparse.has_holes(fd, e.size) else set()
        finally:
            os.close(fd)

    def _specials(self, entries: list[Entry], dst: dict[str, Entry]) -> list[Entry]:
        """The fifos, sockets and devices the lead makes; devices only in root's and operators' syncs."""
        out = []
        for e in diff.specials_to_make(entries, dst):
            if e.kind in DEVICES and not self.spec.owners:
                self.stats.skip(e.path, "device files are copied by root's and operators' syncs only")
            else:
                out.append(e)
        return out

    def _manifest(self, chan: Channel) -> list[Entry]:
        """The destination's entries; the request for the first page has already been sent."""
        entries: list[Entry] = []
        page = 0
        while True:
            ans = chan.answer(f.Kind.MANIFEST)
            if ans.more:  # the mover cuts and encodes the next page while we decode this one
                page += 1
                chan.send(f.Manifest(page))
            entries.extend(map(Entry.from_wire, ans.entries))
            if not ans.more:
                return entries

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
        streams = Streams(self.spec, self.source, self.stats, work, queue, pace, self.report, self.resumed,
                          self.hole_runs)
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
            counters = SyncCounters(bytes_done=now[0], bytes_total=s.bytes_total, files_done=now[1],
                                    files_total=s.files_total, rate=round(rate))
            self.emit({**msgspec.structs.asdict(counters), "eta": None if eta is None else round(eta, 1)})
        return now
