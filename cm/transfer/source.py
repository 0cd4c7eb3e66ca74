"""Reading the source tree for a sender: files opened safely, chunk digests, batches of small files."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from . import checksum, plan, sparse
from .connection import TransferError
from .paths import DirHandles, PathEscape
from .stats import Stats
from .tree import Entry

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class SourceChanged(FileExistsError):
    """A file is not the one that was walked any more (size or mtime changed)."""


def vanished(exc: BaseException) -> bool:
    """Whether a failure to read a source file means the tree moved under the sync: the file (or its
    directory) is gone, or changed since the walk. rsync counts these apart (its exit code 24)."""
    return (isinstance(exc, (FileNotFoundError, NotADirectoryError, SourceChanged, checksum.FileShrank))
            or getattr(exc, "errno", None) == errno.ELOOP)  # opened without following: a symlink now


def describe(exc: BaseException) -> str:
    """A source file's read failure in words (no errno numbers for the common cases)."""
    if isinstance(exc, FileNotFoundError):
        return "vanished before it could be copied"
    if getattr(exc, "errno", None) == errno.ELOOP:
        return "is a symlink now (it changed since the sync listed it)"
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, SourceChanged):
        return exc.strerror
    return str(exc)


def parts(path: str) -> tuple[str, ...]:
    """A tree path's components (``""``, the top: none)."""
    return tuple(path.split("/")) if path else ()


class Source:
    """The source directory of one rank, as walked; failures per path go to ``stats``.

    Every read goes through a ``DirHandles`` (one per thread: never through
    a symlink) and checks the file is still the one walked.
    """

    def __init__(self, top: Path, stats: Stats):
        self.top = top
        self.stats = stats

    def handles(self, capacity: int = 64) -> DirHandles:
        """Directory handles for one thread (the caller closes them)."""
        return DirHandles(self.top, capacity=capacity)

    def open(self, handles: DirHandles, e: Entry) -> int:
        """A read descriptor for ``e``; raises ``SourceChanged`` if it is not as walked."""
        p = parts(e.path)
        fd = os.open(p[-1], _READ, dir_fd=handles.open(p[:-1]))
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != e.size or st.st_mtime_ns != e.mtime_ns:
            os.close(fd)
            raise SourceChanged("changed since the sync listed it")
        return fd

    def failed(self, path: str, exc: BaseException) -> None:
        """Record why source file ``path`` could not be copied."""
        self.stats.error(path, describe(exc), vanished(exc))

    def restat(self, handles: DirHandles, e: Entry) -> Entry | None:
        """``e`` as the source has it now (a regular file), or None if it is not one any more."""
        p = parts(e.path)
        try:
            st = os.stat(p[-1], dir_fd=handles.open(p[:-1]), follow_symlinks=False)
        except (OSError, PathEscape):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return e._replace(size=st.st_size, mtime_ns=st.st_mtime_ns, mode=stat.S_IMODE(st.st_mode),
                          uid=st.st_uid, gid=st.st_gid)

    def chunk_digest(self, handles: DirHandles, it: plan.Item) -> int | None:
        """The digest of one chunk as the source has it, or None if it cannot be read."""
        try:
            fd = self.open(handles, it.entry)
        except (OSError, PathEscape):
            return None
        try:
            if sparse.has_holes(fd, it.entry.size):  # as it travelled (see ``sparse``)
                return sparse.chunk_digest(fd, it.offset, it.length)
            return checksum.chunk_digest(fd, it.offset, it.length)
        except OSError:
            return None
        finally:
            os.close(fd)

    def digests(self, e: Entry, chunk_size: int) -> list[int] | None:
        """Every chunk digest of a file, or None if it cannot be read."""
        handles = self.handles(capacity=4)
        try:
            fd = self.open(handles, e)
        except (OSError, PathEscape):
            return None
        finally:
            handles.close()
        try:
            return checksum.file_digests(fd, e.size, chunk_size)
        except OSError:
            return None
        finally:
            os.close(fd)

    def owner_rows(self, entries: list[Entry]) -> list:
        """(path, uid, gid, mode) of each entry as the source has it now (gone ones left out)."""
        rows = []
        handles = self.handles()  # relative to directory descriptors: a path may be longer than PATH_MAX
        try:
            for e in entries:
                p = parts(e.path)
                try:
                    st = os.stat(p[-1], dir_fd=handles.open(p[:-1]), follow_symlinks=False) if p else \
                        os.fstat(handles.open(()))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except (OSError, PathEscape) as exc:
                    self.failed(e.path, exc)
                    continue
                rows.append((os.fsencode(e.path), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)))
        finally:
            handles.close()
        return rows

    def read_batch(self, handles: DirHandles, items: list[plan.Item], buf: memoryview) -> tuple[list[bool], list[int]]:
        """Read each file of a batch into ``buf``, one after another; returns (which were read whole,
        indices of those that are not as walked any more: the caller may read them again as they are now).

        Compiled code reads the runs of files that share a directory; a file
        it could not read is tried again here, which records why (but not for a changed one).
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
        changed: list[int] = []
        arr, work = np.frombuffer(buf, dtype=np.uint8), batchio.stat_scratch()
        for i, end in batchio.runs([parent for parent, _, _ in split]):
            try:
                dfd = handles.open(parts(split[i][0]))
            except (OSError, PathEscape) as exc:
                for k in range(i, end):
                    self.failed(items[k].entry.path, exc)
                continue
            batchio.read_run(dfd, names, name_off, sizes, mtimes, arr, offsets, ok, i, end, work)
            for k in range(i, end):
                if not ok[k]:
                    try:
                        self.read_one(handles, items[k].entry, buf[offsets[k]:offsets[k + 1]])
                        ok[k] = True
                    except SourceChanged:
                        changed.append(k)
                    except (OSError, PathEscape) as exc:
                        self.failed(items[k].entry.path, exc)
        return ok.tolist(), changed

    def read_one(self, handles: DirHandles, e: Entry, into: memoryview) -> None:
        """Read one file whole into ``into`` (its size); raises ``SourceChanged`` if it is not as walked
        (before or after the read), else the ``OSError`` that stopped it."""
        fd = self.open(handles, e)
        try:
            n = 0
            while n < e.size:
                r = os.readv(fd, [into[n:]])
                if r == 0:
                    raise SourceChanged("was cut short while being read")
                n += r
            st = os.fstat(fd)
            if st.st_size != e.size or st.st_mtime_ns != e.mtime_ns:
                raise SourceChanged("changed while being read")
        finally:
            os.close(fd)
