"""The sending end of the mover: one per source node of a sync job.

``Sender.run`` walks the source, asks the destination what it has, works
out this rank's share (``plan``) and what of it the destination lacks
(``diff``), then streams it over several connections: chunks of large files
straight out of a mapped file, small files packed into batches. A chunk or
file whose checksum does not match on arrival is sent again (a few times at
most). Progress goes to ``emit`` a few times a second.
"""

from __future__ import annotations

import itertools
import mmap
import os
import socket
import stat
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import diff, plan
from .partial import chunk_count
from .paths import DirHandles, PathEscape, check_lexical, confine
from .spec import Spec
from .tree import FILE, Entry, Excluder, walk
from .wire import Channel, Kind, ProtocolError, RemoteError, tune

CONNECT_TIMEOUT = 30.0
IO_TIMEOUT = 600.0
MAX_RESENDS = 3  # times a part whose checksum failed is sent again
STREAMS_PER_FILE = 1  # a second writer of one file only spins on its inode lock (buffered writes serialise)
LIST_PAGE = 5000  # rows per structure request
PROGRESS_EVERY = 0.25  # seconds between progress lines

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class TransferError(Exception):
    """The transfer cannot go on (destination unreachable, refused, protocol broken).

    `transient` marks a failure of the network or of the receiving node, which
    a new attempt may not meet; a refusal or a broken protocol is not.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class Throttle:
    """Caps the bytes per second of all streams together (token bucket without burst)."""

    def __init__(self, rate: float):
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def __call__(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + n / self.rate
        if start > now:
            time.sleep(start - now)


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
    errors: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        """Add to several counters at once."""
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def error(self, path: str, message: str) -> None:
        """Record a failure for one path; the transfer goes on."""
        with self.lock:
            self.errors.append(f"{path or '.'}: {message}")


def _parts(path: str) -> tuple[str, ...]:
    return tuple(path.split("/")) if path else ()


def warm_up() -> None:
    """Load numba and the compiled code a sender runs (checksums, batch reads)."""
    from . import batchio, checksum

    checksum.warm_up()
    batchio.warm_up_reading()


def _corrupt_target() -> tuple[str, int] | None:
    raw = os.environ.get("CM_TEST_CORRUPT")
    if not raw or ":" not in raw:
        return None
    path, _, index = raw.rpartition(":")
    try:
        return check_lexical(path), int(index)
    except ValueError:
        return None


class Sender:
    """Runs one rank of a sync job described by a ``Spec``."""

    def __init__(self, spec: Spec, emit: Callable[[dict], None]):
        self.spec = spec
        self.emit = emit
        self.stats = Stats()
        self.excluder = Excluder(spec.exclude)
        self._pacer = Throttle(spec.bwlimit) if spec.bwlimit else None
        self._corrupt = _corrupt_target()
        self._corrupt_lock = threading.Lock()
        self._channels: list[Channel] = []
        self._fatal: BaseException | None = None
        self._pending: deque = deque()
        self._active: Counter = Counter()  # streams busy with chunks of each file
        self._units_lock = threading.Condition()
        self._remaining: Counter = Counter()
        self._first_paths: set[str] = set()
        self.src_dir: Path | None = None

    # ---- connections ----

    def connect(self) -> Channel:
        """Open an authenticated connection to the destination's receiver."""
        try:
            sock = socket.create_connection((self.spec.dst_host, self.spec.dst_port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            raise TransferError(f"cannot reach the receiver at {self.spec.dst_host}:{self.spec.dst_port}: {exc}",
                                transient=True) from exc
        tune(sock)
        sock.settimeout(IO_TIMEOUT)
        chan = Channel(sock)
        self._channels.append(chan)
        try:
            ans = chan.request(Kind.HELLO, {"transfer_id": self.spec.transfer_id, "token": self.spec.token, "version": 1})
        except RemoteError as exc:
            raise TransferError(f"the receiver refused the transfer: {exc}") from exc
        if self.spec.chunk_size > ans.get("max_chunk", 0):
            raise TransferError(f"chunk size {self.spec.chunk_size} exceeds the receiver's {ans.get('max_chunk')}")
        return chan

    def _request_pages(self, chan: Channel, kind: Kind, key: str, rows: list, answer_key: str | None = None) -> list:
        out: list = []
        for i in range(0, len(rows), LIST_PAGE):
            ans = chan.request(kind, {key: rows[i:i + LIST_PAGE]})
            for path, message in ans.get("errors", []):
                self.stats.error(os.fsdecode(path), message)
            if answer_key:
                out.extend(ans[answer_key])
        return out

    # ---- the run ----

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
        self.src_dir = top.parent if single_file else top
        control = self.connect()
        try:
            # the receiver walks the destination while we walk the source
            control.send(Kind.MANIFEST, {"exclude": list(self.spec.exclude), "page": 0})
            entries = walk(top, self.excluder)
            src = {e.path: e for e in entries}
            dst_list = self._manifest(control)
            dst = {e.path: e for e in dst_list}
            small, chunks, meta, would = self._decide(control, entries, dst)
            lead = spec.rank == 0
            tops, gone = diff.deletions(src, dst_list) if lead and spec.delete and not single_file else ([], [])
            mkdirs = diff.dirs_to_make(entries, dst)
            links = diff.links_to_make(entries, dst) if lead else []
            if spec.dry_run:
                would = [f"delete {p}" for p in gone] + [f"send {e.path}/" for e in mkdirs if lead and e.path] + \
                    [f"send {e.path}" for e in links] + would
                self.stats.files_deleted = len(gone)
                return self._report(started, would=would)
            if chunks or small:
                threading.Thread(target=warm_up, name="warm-up", daemon=True).start()  # while directories are made
            touched = self._structure(control, tops, gone, mkdirs, links, meta)
            self._move_data(control, chunks, small)
            touched.update(diff.parent(it.entry.path) for it in chunks + small)
            dirs = diff.dir_meta(entries, dst, touched)
            self._request_pages(control, Kind.DIRMETA, "dirs",
                                [[os.fsencode(e.path), e.mode, e.mtime_ns] for e in reversed(dirs)])
            if spec.owners:  # root's and operators' syncs: each rank its own files, the lead the rest
                owned = self._owned + ([e for e in entries if e.kind != FILE] if lead else [])
                self._request_pages(control, Kind.OWNERS, "entries", self._owner_rows(owned))
            control.send(Kind.BYE, {})
        except (ConnectionError, TimeoutError) as exc:
            raise TransferError(f"lost the receiver at {spec.dst_host}:{spec.dst_port}: {exc}", transient=True) from exc
        except (ProtocolError, RemoteError) as exc:
            raise TransferError(f"transfer to {spec.dst_host}:{spec.dst_port} failed: {exc}") from exc
        except OSError as exc:  # reading the source tree
            raise TransferError(f"cannot read the source: {exc}") from exc
        finally:
            for chan in self._channels:
                chan.close()
        return self._report(started)

    def _manifest(self, chan: Channel) -> list[Entry]:
        """The destination's entries; the request for the first page has already been sent."""
        entries: list[Entry] = []
        page = 0
        while True:
            if page:
                chan.send(Kind.MANIFEST, {"exclude": list(self.spec.exclude), "page": page})
            ans = chan.answer()
            try:
                entries.extend(map(Entry.from_wire, ans["entries"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise ProtocolError(f"bad manifest from the receiver: {exc}") from None
            if not ans.get("more"):
                return entries
            page += 1

    def _decide(self, chan: Channel, entries: list[Entry], dst: dict[str, Entry]):
        """Which of this rank's items the destination lacks → (small, chunks, meta-only, would)."""
        spec = self.spec
        files = [e for e in entries if e.kind == FILE]
        meta: list[Entry] = []
        self._owned: list[Entry] = []  # files whose owner this rank sets (when the sync keeps owners)
        if spec.nranks == 1 and not spec.checksum:
            # a lone rank owns every file: those already in place need no work item at all
            changed = []
            for e in files:
                d = dst.get(e.path)
                if d is not None and d.kind == FILE and d.size == e.size and d.mtime_ns == e.mtime_ns:
                    self.stats.files_skipped += 1
                    self._owned.append(e)
                    if d.mode != e.mode:
                        meta.append(e)
                else:
                    changed.append(e)
            files = changed
        items = plan.share(plan.make_items(files, spec.chunk_size), spec.rank, spec.nranks, spec.policy)
        by_file: dict[str, list[plan.Item]] = {}
        for it in items:
            by_file.setdefault(it.entry.path, []).append(it)
        same_content: set[str] = set()
        if spec.checksum:
            candidates = [its[0].entry for its in by_file.values()
                          if diff.file_matches(its[0].entry, dst.get(its[0].entry.path), compare_mtime=False)]
            theirs = self._request_pages(chan, Kind.CHECKSUMS, "files",
                                         [[os.fsencode(e.path), e.size, spec.chunk_size] for e in candidates], "digests")
            for e, digests in zip(candidates, theirs):
                if digests is not None and digests == self._digests(e):
                    same_content.add(e.path)
        small: list[plan.Item] = []
        chunks: list[plan.Item] = []
        would: list[str] = []
        big: list[Entry] = []
        for path, its in by_file.items():
            e, d = its[0].entry, dst.get(path)
            owns_file = its[0].first
            same = path in same_content if spec.checksum else diff.file_matches(e, d)
            if owns_file and (same or its[0].index < 0):
                self._owned.append(e)  # a file sent in chunks carries its owner in its CHUNK frames
            if same:
                if owns_file:
                    self.stats.files_skipped += 1
                    if d.mode != e.mode or d.mtime_ns != e.mtime_ns:
                        meta.append(e)
                continue
            if owns_file:
                would.append(f"send {path}")
            if its[0].index < 0:
                small.append(its[0])
            else:
                chunks.extend(its)
                big.append(e)
        if big and not spec.dry_run:
            chunks = self._resume(chan, big, chunks)
        self._remaining = Counter(it.entry.path for it in chunks)
        self._first_paths = {path for path in self._remaining if by_file[path][0].first}
        self.stats.files_total = len(would) if spec.dry_run else len(small) + len(self._first_paths)
        self.stats.bytes_total = sum(it.length for it in small) + sum(it.length for it in chunks)
        return small, chunks, meta, would

    def _owner_rows(self, entries: list[Entry]) -> list[list]:
        """[path, uid, gid, mode] of each entry as the source has it now (gone ones left out)."""
        rows = []
        for e in entries:
            try:
                st = os.lstat(os.path.join(self.src_dir, e.path) if e.path else self.src_dir)
            except FileNotFoundError:
                continue
            rows.append([os.fsencode(e.path), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)])
        return rows

    def _resume(self, chan: Channel, big: list[Entry], chunks: list[plan.Item]) -> list[plan.Item]:
        """Drop chunks the destination already verified (same digest) in an earlier run."""
        cs = self.spec.chunk_size
        verified = self._request_pages(chan, Kind.PARTIALS, "files",
                                       [[os.fsencode(e.path), e.size, e.mtime_ns, cs] for e in big], "verified")
        done = {e.path: {i: d for i, d in v} for e, v in zip(big, verified) if v}
        if not done:
            return chunks
        keep = []
        handles = DirHandles(self.src_dir)
        try:
            for it in chunks:
                have = done.get(it.entry.path, {})
                complete = len(have) == chunk_count(it.entry.size, cs)
                if it.index in have and not (complete and it.index == 0):
                    if self._chunk_digest(handles, it) == have[it.index]:
                        self.stats.chunks_resumed += 1
                        continue
                keep.append(it)
        finally:
            handles.close()
        return keep

    def _open_source(self, handles: DirHandles, e: Entry) -> int:
        parts = _parts(e.path)
        fd = os.open(parts[-1], _READ, dir_fd=handles.open(parts[:-1]))
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != e.size or st.st_mtime_ns != e.mtime_ns:
            os.close(fd)
            raise FileExistsError("changed while being copied; run the sync again")
        return fd

    def _chunk_digest(self, handles: DirHandles, it: plan.Item) -> int | None:
        from . import checksum

        try:
            fd = self._open_source(handles, it.entry)
        except (OSError, PathEscape):
            return None
        try:
            return checksum.chunk_digest(fd, it.offset, it.length)
        finally:
            os.close(fd)

    def _digests(self, e: Entry) -> list[int] | None:
        from . import checksum

        handles = DirHandles(self.src_dir, capacity=4)
        try:
            fd = self._open_source(handles, e)
        except (OSError, PathEscape):
            return None
        finally:
            handles.close()
        try:
            return checksum.file_digests(fd, e.size, self.spec.chunk_size)
        finally:
            os.close(fd)

    def _structure(self, chan: Channel, tops, gone, mkdirs, links, meta) -> set[str]:
        """Deletions, directories, symlinks and metadata-only updates, before any file data."""
        touched: set[str] = set()
        if tops:
            self._request_pages(chan, Kind.DELETE, "paths", [os.fsencode(p) for p in tops])
            self.stats.files_deleted = len(gone)
            touched.update(diff.parent(p) for p in tops)
        if mkdirs:
            self._request_pages(chan, Kind.MKDIRS, "dirs", [[os.fsencode(e.path), e.mode] for e in mkdirs])
            touched.update(diff.parent(e.path) for e in mkdirs if e.path)
            touched.update(e.path for e in mkdirs)
        if links:
            self._request_pages(chan, Kind.SYMLINKS, "links",
                                [[os.fsencode(e.path), os.fsencode(e.target), e.mtime_ns] for e in links])
            touched.update(diff.parent(e.path) for e in links)
            self.stats.files_sent += len(links)
        if meta:
            self._request_pages(chan, Kind.META, "files", [[os.fsencode(e.path), e.mode, e.mtime_ns] for e in meta])
        return touched

    # ---- file data ----

    def _move_data(self, control: Channel, chunks: list[plan.Item], small: list[plan.Item]) -> None:
        self._pending = deque([("chunk", it) for it in chunks] + [("batch", b) for b in plan.batches(small)])
        if not self._pending:
            return
        nstreams = min(self.spec.streams, len(self._pending))
        channels = [control] + [self.connect() for _ in range(nstreams - 1)]
        threads = [threading.Thread(target=self._stream, args=(ch,), name=f"stream-{i}", daemon=True)
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
        if self._fatal is not None:
            raise self._fatal

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

    def _take_unit(self):
        """Next unit of work for a stream, or None when all is done (or failed).

        Chunks of a file already being sent by ``STREAMS_PER_FILE`` streams
        are passed over for other work, or waited for.
        """
        with self._units_lock:
            while self._fatal is None and self._pending:
                for i, (kind, work) in enumerate(itertools.islice(self._pending, 64)):
                    if kind != "chunk" or self._active[work.entry.path] < STREAMS_PER_FILE:
                        del self._pending[i]
                        if kind == "chunk":
                            self._active[work.entry.path] += 1
                        return kind, work
                self._units_lock.wait(1.0)
            return None

    def _unit_done(self, kind: str, work) -> None:
        if kind == "chunk":
            with self._units_lock:
                self._active[work.entry.path] -= 1
                self._units_lock.notify_all()

    def _stream(self, chan: Channel) -> None:
        handles = DirHandles(self.src_dir)
        buf = bytearray(plan.BATCH_BYTES)  # a batch never holds more (sizes are checked when read)
        try:
            while (unit := self._take_unit()) is not None:
                kind, work = unit
                try:
                    if kind == "chunk":
                        self._send_chunk(chan, handles, work)
                    else:
                        self._send_batch(chan, handles, work, memoryview(buf))
                finally:
                    self._unit_done(kind, work)
        except (ConnectionError, TimeoutError, ProtocolError, RemoteError, TransferError) as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(TransferError(f"stream failed: {exc}"))
        finally:
            handles.close()

    def _fail(self, exc: BaseException) -> None:
        with self._units_lock:
            if self._fatal is None:
                self._fatal = exc
            self._units_lock.notify_all()

    def _pace(self, n: int) -> None:
        if self._pacer is not None:
            self._pacer(n)
        self.stats.add(bytes_done=n)

    def _take_corrupt(self, path: str, index: int) -> bool:
        with self._corrupt_lock:
            if self._corrupt is not None and self._corrupt == (path, max(index, 0)):
                self._corrupt = None
                return True
            return False

    def _send_chunk(self, chan: Channel, handles: DirHandles, it: plan.Item) -> None:
        from . import checksum

        e = it.entry
        try:
            fd = self._open_source(handles, e)
        except (OSError, PathEscape) as exc:
            self.stats.error(e.path, str(exc))
            return
        meta = {"path": os.fsencode(e.path), "size": e.size, "mode": e.mode, "mtime": e.mtime_ns,
                "chunk_size": self.spec.chunk_size, "index": it.index}
        try:
            if self.spec.owners:  # whichever rank sends the last chunk publishes the file: each chunk says whose
                st = os.fstat(fd)
                meta.update(uid=st.st_uid, gid=st.st_gid)
            mm = mmap.mmap(fd, it.length, offset=it.offset, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            mm.madvise(mmap.MADV_SEQUENTIAL)
            for attempt in range(1 + MAX_RESENDS):
                chan.send_stream(Kind.CHUNK, meta, mm, checksum.Hasher(), self._pace,
                                 corrupt=self._take_corrupt(e.path, it.index),
                                 sent=lambda pos, n: mm.madvise(mmap.MADV_DONTNEED, pos, n))
                ans = chan.answer()
                self.stats.add(bytes_sent=it.length)
                if ans.get("ok"):
                    break
                if ans.get("error"):  # the receiver may not write this file (as the job's user)
                    self.stats.error(e.path, str(ans["error"]))
                    return
                self.stats.add(chunks_resent=1)
            else:
                self.stats.error(e.path, f"chunk {it.index} kept failing its checksum")
                return
        finally:
            mm.close()
        with self.stats.lock:
            self._remaining[e.path] -= 1
            if self._remaining[e.path] == 0 and e.path in self._first_paths:
                self.stats.files_done += 1
                self.stats.files_sent += 1

    def _send_batch(self, chan: Channel, handles: DirHandles, items: list[plan.Item], buf: memoryview,
                    attempt: int = 0) -> None:
        from . import checksum

        ok = self._read_batch(handles, items, buf)
        rows, offsets, sent_items = [], [0], []
        pos = src = 0
        for it, read in zip(items, ok):
            e = it.entry
            if read:
                if pos != src:  # close the gap a file that could not be read left
                    buf[pos:pos + e.size] = bytes(buf[src:src + e.size])
                rows.append([os.fsencode(e.path), e.size, e.mode, e.mtime_ns, 0])
                sent_items.append(it)
                pos += e.size
                offsets.append(pos)
            src += e.size
        if not rows:
            return
        payload = buf[:pos]
        for row, d in zip(rows, checksum.digest_many(payload, offsets)):
            row[4] = d
        for i, it in enumerate(sent_items):
            if it.length and self._take_corrupt(it.entry.path, 0):
                payload[offsets[i]] ^= 0xFF
        self._pace(pos)
        ans = chan.request(Kind.BATCH, {"files": rows}, payload)
        self.stats.add(bytes_sent=pos)
        for path, message in ans.get("errors", []):
            self.stats.error(os.fsdecode(path), message)
        bad = set(ans.get("bad", []))
        failed = {os.fsdecode(p) for p, _ in ans.get("errors", [])}
        ok = sum(1 for i, it in enumerate(sent_items) if i not in bad and it.entry.path not in failed)
        self.stats.add(files_done=ok, files_sent=ok)
        if bad:
            retry = [sent_items[i] for i in sorted(bad) if 0 <= i < len(sent_items)]
            self.stats.add(chunks_resent=len(retry))
            if attempt >= MAX_RESENDS:
                for it in retry:
                    self.stats.error(it.entry.path, "kept failing its checksum")
                return
            self._send_batch(chan, handles, retry, buf, attempt + 1)

    def _read_batch(self, handles: DirHandles, items: list[plan.Item], buf: memoryview) -> list[bool]:
        """Read each file of a batch into ``buf``, one after another; returns which were read whole.

        Compiled code reads the runs of files that share a directory; a file
        it could not read is tried again here, which records why.
        """
        import numpy as np

        from . import batchio

        n = len(items)
        split = [it.entry.path.rpartition("/") for it in items]
        names, name_off = batchio.pack_names([os.fsencode(name) for _, _, name in split])
        sizes = np.fromiter((it.entry.size for it in items), dtype=np.int64, count=n)
        mtimes = np.fromiter((it.entry.mtime_ns for it in items), dtype=np.int64, count=n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        if offsets[-1] > len(buf):
            raise TransferError(f"a batch of {offsets[-1]} bytes does not fit its {len(buf)}-byte buffer")
        ok = np.zeros(n, dtype=np.bool_)
        arr, work = np.frombuffer(buf, dtype=np.uint8), batchio.stat_scratch()
        for i, end in batchio.runs([parent for parent, _, _ in split]):
            try:
                dfd = handles.open(_parts(split[i][0]))
            except (OSError, PathEscape) as exc:
                for k in range(i, end):
                    self.stats.error(items[k].entry.path, str(exc))
                continue
            batchio.read_run(dfd, names, name_off, sizes, mtimes, arr, offsets, ok, i, end, work)
            for k in range(i, end):
                if not ok[k]:
                    ok[k] = self._read_one(handles, items[k].entry, buf[offsets[k]:offsets[k + 1]])
        return ok.tolist()

    def _read_one(self, handles: DirHandles, e: Entry, into: memoryview) -> bool:
        """Read one file whole into ``into`` (its size); records why not and returns False."""
        try:
            fd = self._open_source(handles, e)
        except (OSError, PathEscape) as exc:
            self.stats.error(e.path, str(exc))
            return False
        try:
            n = 0
            while n < e.size:
                r = os.readv(fd, [into[n:]])
                if r == 0:
                    raise EOFError
                n += r
            return True
        except (OSError, EOFError):
            self.stats.error(e.path, "could not be read whole; run the sync again")
            return False
        finally:
            os.close(fd)

    def _report(self, started: float, would: list[str] | None = None) -> dict:
        s = self.stats
        report = {"done": True, "bytes_sent": s.bytes_sent, "files_sent": s.files_sent,
                  "files_deleted": s.files_deleted, "files_skipped": s.files_skipped,
                  "chunks_resent": s.chunks_resent, "chunks_resumed": s.chunks_resumed,
                  "bytes_total": s.bytes_total, "files_total": s.files_total,
                  "errors": len(s.errors), "elapsed": round(time.monotonic() - started, 3)}
        if would is not None:
            report["would"] = would
        return report
