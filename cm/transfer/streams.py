"""A sender's work queue and the streams that empty it: chunks out of mapped files, batches of small files.

Each stream is a thread with a channel of its own. It takes the next unit
(a chunk, or a batch of small files) from the shared ``WorkQueue``, sends
it and reads the answer; a chunk or file whose checksum did not match on
arrival is sent again, ``MAX_RESENDS`` times at most. The first stream that
meets a broken connection stops them all.
"""

from __future__ import annotations

import itertools
import mmap
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
from .source import Source
from .spec import Spec
from .stats import Stats
from .wire import Channel, ProtocolError, RemoteError

MAX_RESENDS = 3  # times a part whose checksum failed is sent again
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

    def _pace(self, n: int) -> None:
        if self._pacer is not None:
            self._pacer(n)
        self.stats.add(bytes_done=n)

    def _send_chunk(self, chan: Channel, handles: DirHandles, it: plan.Item) -> None:
        e = it.entry
        try:
            fd = self.source.open(handles, e)
        except (OSError, PathEscape) as exc:
            self.stats.error(e.path, str(exc))
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
                mm = sparse.payload(fd, it.offset, holes)
            else:
                mm = mmap.mmap(fd, it.length, offset=it.offset, prot=mmap.PROT_READ)
        except EOFError:
            self.stats.error(e.path, "changed while being copied; run the sync again")
            return
        finally:
            os.close(fd)
        try:
            if holes is None:
                mm.madvise(mmap.MADV_SEQUENTIAL)
                drop = lambda pos, n: mm.madvise(mmap.MADV_DONTNEED, pos, n)  # noqa: E731
            else:
                after = sum(min(self.spec.chunk_size, e.size - k * self.spec.chunk_size)
                            for k in range(it.index + 1, it.index + 1 + frame.holes_after))
                self.stats.add(bytes_done=it.length - len(mm) + after)  # the holes: done without sending them
                drop = None
            for _ in range(1 + MAX_RESENDS):
                digest = chan.send_stream(frame, mm, checksum.Hasher() if holes is None else sparse.hasher(holes),
                                          self._pace, sent=drop)
                ans = chan.answer(f.Kind.CHUNK)
                self.stats.add(bytes_sent=len(mm))
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
            if holes is None:
                mm.close()
        work = self.work
        with self.stats.lock:
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

    def _send_batch(self, chan: Channel, handles: DirHandles, items: list[plan.Item], buf: memoryview,
                    attempt: int = 0) -> None:
        ok = self.source.read_batch(handles, items, buf)
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
        if not rows:
            return
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
