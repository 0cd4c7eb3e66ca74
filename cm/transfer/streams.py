"""A sender's work queue and the streams that empty it: chunks of large files, batches of small files.

Each stream is a thread with a channel of its own. It takes the next unit
(a chunk, or a batch of small files) from the shared ``WorkQueue``, sends
it and reads the answer; a chunk or file whose checksum did not match on
arrival is sent again, ``MAX_RESENDS`` times at most. The first stream that
meets a broken connection stops them all. A source file that vanished or
changed while it was read is reported by name and the rest goes on (a
small one is read again as it is now, ``MAX_READS`` times at most).
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from collections import Counter, deque
from typing import Callable

from . import frames as f
from . import checksum, plan, sparse
from .connection import TransferError
from .decide import Work
from .paths import DirHandles, PathEscape
from .report import Report, digest_hex
from .ring import PieceRing
from .source import Source, SourceChanged
from .spec import Spec
from .stats import Stats
from .wire import PIECE, Channel, ProtocolError, RemoteError

MAX_RESENDS = 3  # times a part whose checksum failed is sent again
MAX_READS = 4  # times a small file that changes while it is read is read (a live log); then it is reported
STREAMS_PER_FILE = 1  # a second writer of one file only spins on its inode lock (buffered writes serialise)
CHUNK, BATCH = "chunk", "batch"


class WorkQueue:
    """Units of work — (CHUNK, item) or (BATCH, [items]) — shared by the streams.

    Chunks of a file already being sent by ``STREAMS_PER_FILE`` streams are
    passed over for other work, or waited for. ``fatal`` is the first error
    that stopped a stream; after it, ``take`` gives nothing more.
    """

    def __init__(self, work: Work):
        self._pending: deque = deque([(CHUNK, it) for it in work.chunks] +
                                     [(BATCH, b) for b in plan.batches(work.small)])
        self._active: Counter = Counter()  # streams busy with chunks of each file
        self._cond = threading.Condition()
        self.fatal: BaseException | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def take(self):
        """The next unit for a stream, or None when all is done (or failed)."""
        with self._cond:
            while self.fatal is None and self._pending:
                for i, (kind, work) in enumerate(itertools.islice(self._pending, 64)):
                    if kind != CHUNK or self._active[work.entry.path] < STREAMS_PER_FILE:
                        del self._pending[i]
                        if kind == CHUNK:
                            self._active[work.entry.path] += 1
                        return kind, work
                self._cond.wait(1.0)
            return None

    def done(self, kind: str, work) -> None:
        """A unit taken has been sent (or given up)."""
        if kind == CHUNK:
            with self._cond:
                self._active[work.entry.path] -= 1
                self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        """Stop every stream; the first failure is the one reported."""
        with self._cond:
            if self.fatal is None:
                self.fatal = exc
            self._cond.notify_all()


class Streams:
    """Sends the units of a ``WorkQueue``; ``stream(chan)`` is one stream thread's body."""

    def __init__(self, spec: Spec, source: Source, stats: Stats, work: Work, queue: WorkQueue,
                 pace: Callable[[int], None] | None = None, report: Report | None = None,
                 resumed: dict[str, int] | None = None, hole_runs: dict[tuple[str, int], int] | None = None):
        self.spec = spec
        self.source = source
        self.stats = stats
        self.work = work
        self.queue = queue
        self._pacer = pace
        self._local = threading.local()
        self.report = report or Report()
        self.resumed = resumed or {}
        self.hole_runs = hole_runs or {}  # (path, index): all-hole chunks that go with that one
        self._digests: dict[str, dict[int, int]] = {}  # chunk digests sent, per file (for the report)

    def stream(self, chan: Channel) -> None:
        """Send units until the queue is empty or a stream failed."""
        handles = self.source.handles()
        buf = bytearray(plan.BATCH_BYTES)  # a batch never holds more (sizes are checked when read)
        try:
            while (unit := self.queue.take()) is not None:
                kind, work = unit
                try:
                    if kind == CHUNK:
                        self._send_chunk(chan, handles, work)
                    else:
                        self._send_batch(chan, handles, work, memoryview(buf))
                finally:
                    self.queue.done(kind, work)
        except (ConnectionError, TimeoutError, ProtocolError, RemoteError, TransferError) as exc:
            self.queue.fail(exc)
        except OSError as exc:
            self.queue.fail(TransferError(f"stream failed: {exc}"))
        except Exception as exc:  # a bug: stop the others too, or the run waits on a connection left mid-frame
            self.queue.fail(TransferError(f"stream failed: internal error in the sender: {exc!r}"))
            raise
        finally:
            handles.close()
            ring = getattr(self._local, "ring", None)
            if ring is not None:
                ring.close()

    def _pace(self, n: int) -> None:
        if self._pacer is not None:
            self._pacer(n)
        self.stats.add(bytes_done=n)

    def _send_chunk(self, chan: Channel, handles: DirHandles, it: plan.Item) -> None:
        e = it.entry
        try:
            fd = self.source.open(handles, e)
        except (OSError, PathEscape) as exc:
            self.source.failed(e.path, exc)
            return
        frame = f.Chunk(os.fsencode(e.path), e.size, e.mode, e.mtime_ns, self.spec.chunk_size, it.index)
        holes = None
        try:
            if self.spec.owners:  # whichever rank sends the last chunk publishes the file: each chunk says whose
                st = os.fstat(fd)
                frame.uid, frame.gid = st.st_uid, st.st_gid
            if sparse.has_holes(fd, e.size):  # only its data travels; the holes stay holes
                holes = sparse.extents(fd, it.offset, it.length)
                frame.extents = [f.ExtentRow(off, n) for off, n in holes]
                frame.holes_after = self.hole_runs.get((e.path, it.index), 0)
                after = sum(min(self.spec.chunk_size, e.size - k * self.spec.chunk_size)
                            for k in range(it.index + 1, it.index + 1 + frame.holes_after))
                self.stats.add(bytes_done=it.length - sum(n for _, n in holes) + after)  # the holes: done, not sent
            for _ in range(1 + MAX_RESENDS):
                if holes is None:
                    reader = _ChunkReader(fd, it, self._buffer(it.length))
                    try:
                        digest = _send_reading(chan, frame, reader, reader.view, self._pace)
                    finally:
                        reader.release()
                    changed, sent_bytes = reader.changed, it.length
                else:  # the data extents, read whole before they are sent (pread: no SIGBUS if it shrinks)
                    try:
                        data = sparse.payload(fd, it.offset, holes)
                    except EOFError:
                        self.source.failed(e.path, SourceChanged("was cut short while being read"))
                        return
                    now = os.fstat(fd)
                    if now.st_size != e.size or now.st_mtime_ns != e.mtime_ns:
                        self.source.failed(e.path, SourceChanged("changed while being read"))
                        return
                    digest = _send_reading(chan, frame, sparse.hasher(holes), data, self._pace)
                    changed, sent_bytes = "", len(data)
                ans = chan.answer(f.Kind.CHUNK)
                self.stats.add(bytes_sent=sent_bytes)
                if changed:  # the receiver dropped it (its digest was spoiled on purpose)
                    self.source.failed(e.path, SourceChanged(changed))
                    return
                if ans.ok:
                    break
                if ans.error:  # the receiver may not write this file (as the job's user)
                    self.stats.error(e.path, ans.error)
                    return
                self.stats.add(chunks_resent=1)
            else:
                self.stats.error(e.path, f"chunk {it.index} kept failing its checksum")
                return
        finally:
            os.close(fd)
        work = self.work
        with self.stats.lock:
            work.verified[e.path] += it.length
            work.remaining[e.path] -= 1
            sent = self._digests.setdefault(e.path, {}) if self.report else {}
            sent[it.index] = digest
            finished = work.remaining[e.path] == 0 and e.path in work.first_paths
            if finished:
                self.stats.files_done += 1
                self.stats.files_sent += 1
                self._digests.pop(e.path, None)
        if finished and self.report:
            self.report.made(e.path, "f", size=e.size, chunks_xxh3=[digest_hex(sent[i]) for i in sorted(sent)],
                             chunks_resumed=self.resumed.get(e.path) or None)

    def _buffer(self, length: int) -> memoryview:
        """This thread's buffer for one chunk: ``length`` bytes over one piece of memory (``ring``)."""
        ring = getattr(self._local, "ring", None)
        if ring is None or ring.size < length:
            if ring is not None:
                ring.close()
            ring = self._local.ring = PieceRing(length, PIECE)
        return ring.view(length)

    def _send_batch(self, chan: Channel, handles: DirHandles, items: list[plan.Item], buf: memoryview,
                    attempt: int = 0, reads: int = 1) -> None:
        ok, changed = self.source.read_batch(handles, items, buf)
        rows, offsets, sent_items = [], [0], []
        pos = src = 0
        for it, read in zip(items, ok):
            e = it.entry
            if read:
                if pos != src:  # close the gap a file that could not be read left
                    buf[pos:pos + e.size] = bytes(buf[src:src + e.size])
                row = f.BatchRow(os.fsencode(e.path), e.size, e.mode, e.mtime_ns, 0)
                if self.spec.owners:  # created with its owner (as the walk saw it): no owners pass for it
                    row.uid, row.gid = e.uid, e.gid
                rows.append(row)
                sent_items.append(it)
                pos += e.size
                offsets.append(pos)
            src += e.size
        if rows:
            self._send_rows(chan, handles, rows, sent_items, offsets, buf, pos, attempt)
        if changed:  # read again as they are now, a few times at most (a live log: each read is a snapshot)
            self._reread(chan, handles, [items[k] for k in changed], buf, reads)

    def _reread(self, chan: Channel, handles: DirHandles, items: list[plan.Item], buf: memoryview,
                reads: int) -> None:
        again = []
        for it in items:
            if reads >= MAX_READS:
                self.stats.error(it.entry.path, f"kept changing while being read ({reads} reads)", vanished=True)
                continue
            now = self.source.restat(handles, it.entry)
            if now is None:
                self.source.failed(it.entry.path, FileNotFoundError(errno.ENOENT, "vanished"))
            elif not plan.is_small(now.size, self.spec.chunk_size):
                self.source.failed(it.entry.path, SourceChanged("grew while being read; run the sync again"))
            else:
                again.append(it._replace(entry=now, length=now.size))
        if again:
            self._send_batch(chan, handles, again, buf, reads=reads + 1)

    def _send_rows(self, chan: Channel, handles: DirHandles, rows: list, sent_items: list, offsets: list,
                   buf: memoryview, pos: int, attempt: int) -> None:
        payload = buf[:pos]
        for row, d in zip(rows, checksum.digest_many(payload, offsets)):
            row.digest = d
        self._pace(pos)
        ans = chan.request(f.Batch(rows), payload)
        self.stats.add(bytes_sent=pos)
        for err in ans.errors:
            self.stats.error(os.fsdecode(err.path), err.message)
        bad = set(ans.bad)
        failed = {os.fsdecode(err.path) for err in ans.errors}
        ok = sum(1 for i, it in enumerate(sent_items) if i not in bad and it.entry.path not in failed)
        self.stats.add(files_done=ok, files_sent=ok)
        if self.report:
            for i, (it, row) in enumerate(zip(sent_items, rows)):
                if i not in bad and it.entry.path not in failed:
                    self.report.made(it.entry.path, "f", size=it.entry.size, xxh3=digest_hex(row.digest))
        if bad:
            retry = [sent_items[i] for i in sorted(bad) if 0 <= i < len(sent_items)]
            self.stats.add(chunks_resent=len(retry))
            if attempt >= MAX_RESENDS:
                for it in retry:
                    self.stats.error(it.entry.path, "kept failing its checksum")
                return
            self._send_batch(chan, handles, retry, buf, attempt + 1)


class _ChunkReader:
    """Reads a chunk from its file a piece at a time, as ``Channel.send_stream`` sends it.

    It is the stream's hasher: ``update`` first fills the piece (``pread``
    into the stream's ``PieceRing``, never a mapping of the file, so a file
    cut short meanwhile cannot raise SIGBUS) and then hashes it. A file found shorter,
    or whose size or mtime changed by the end of the chunk, is ``changed``:
    the rest is sent as zeros and the digest is spoiled on purpose, so the
    receiver drops the chunk (no torn file is ever published) and the stream
    stays in step.
    """

    def __init__(self, fd: int, it: plan.Item, view: memoryview):
        self._fd, self._entry, self._offset = fd, it.entry, it.offset
        self.view = view
        self._pos = 0
        self._hasher = checksum.Hasher()
        self.changed = ""

    def update(self, piece: memoryview) -> None:
        n, got = len(piece), 0
        while got < n and not self.changed:
            try:
                r = os.preadv(self._fd, [piece[got:]], self._offset + self._pos + got)
            except OSError as exc:
                self.changed = f"could not be read: {exc.strerror or exc}"
                break
            if r == 0:
                self.changed = "was cut short while being read"
            got += r
        if got < n:
            piece[got:] = bytes(n - got)
        self._hasher.update(piece)
        self._pos += n

    def digest(self) -> int:
        d = self._hasher.digest()
        if not self.changed:
            st = os.fstat(self._fd)
            if st.st_size != self._entry.size or st.st_mtime_ns != self._entry.mtime_ns:
                self.changed = "changed while being read"
        return d ^ 1 if self.changed else d

    def release(self) -> None:
        self.view.release()


def _send_reading(chan: Channel, frame: f.Chunk, hasher, data, pace) -> int:
    """Stream one chunk's ``data`` (its digest from ``hasher``, which may read the data as it goes:
    ``_ChunkReader``); returns the digest sent. If the receiver hangs up meanwhile, what it said before
    is what is raised."""
    try:
        return chan.send_stream(frame, data, hasher, pace)
    except (BrokenPipeError, ConnectionResetError) as exc:
        said = _last_word(chan)
        if said is not None:
            raise said from exc
        raise


def _last_word(chan: Channel) -> RemoteError | None:
    """The ERROR a receiver sent before it closed the connection, if it is there to read."""
    try:
        chan.answer(f.Kind.CHUNK)
    except RemoteError as exc:
        return exc
    except (OSError, ProtocolError):
        pass
    return None
