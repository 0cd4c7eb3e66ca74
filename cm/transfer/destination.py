"""Changes to a destination tree, made on behalf of one sender connection.

Every path arrives relative to the registered destination and is split by
``wire_parts`` (no ``..``, nothing absolute); every directory is reached
through ``DirHandles`` (never through a symlink). A file's data goes into a
temporary file in its final directory and appears under its name only
after it matched the sender's checksum, complete, with mode and mtime
already set: small files are checked in memory before anything is written.
Publishing is atomic: ``linkat`` of an unnamed ``O_TMPFILE`` file when the
name is free (one directory operation instead of create + rename), else
``rename`` of a named temporary over what is there; large files are
assembled in a ``.part`` file (see ``partial``) and renamed when every chunk
is verified. Operations that touch many paths report failures per path and
go on.

Directories are written into as the job's user, so one whose mode takes
away its owner's write bit (``0555``, applied by an earlier run, or by
another rank's ``dir_meta`` while this rank still writes there) would refuse
this rank's files: ``in_dir`` gives such a directory of the user's its
owner's bits back and does the operation again, as rsync does. The rank's
own ``dir_meta``, which follows its last write into the directory (the sender
names every directory it wrote into), gives the source's mode back, so
whichever rank ends last leaves the source's mode and mtime.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import secrets
import shutil
import stat
import sys
from pathlib import Path

import numpy as np

from . import batchio, checksum, sparse
from .frames import BatchRow, ChecksumRow, Chunk, DirRow, LinkRow, MetaRow, OwnerRow, PartialRow, PathError
from .partial import SPARSE, WHOLE, ChunkRecord, chunk_count, lock, partial_names
from .paths import DirHandles, PathEscape, wire_parts
from .tree import no_collection, walk_fd

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MEMORY_FS = {0x01021994, 0x858458F6}  # tmpfs, ramfs (statfs f_type)
_memory_devices: dict[int, bool] = {}
_UNNAMED = os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
NO_ROOM = (errno.ENOSPC, errno.EDQUOT)  # a write that fails for want of room fails the same way again
_OPEN_UP_TRIES = 4  # each try past the first needs another rank's dir_meta to land in between


def in_dir(dfd: int, op, *args, **kwargs):
    """``op(*args, **kwargs)``, which makes or removes a name in directory ``dfd``; refused because the
    directory lacks its owner's write or search bit, again once it has them (see the module's note)."""
    tries = 1
    while True:
        try:
            return op(*args, **kwargs)
        except PermissionError:
            if tries == _OPEN_UP_TRIES or not _open_up(dfd):
                raise
            tries += 1


def _open_up(dfd: int) -> bool:
    """Give directory ``dfd`` its owner's read, write and search bits if it lacks write or search; whether
    it did (False: it had them, so the refusal has another cause, or it is not this user's to change)."""
    try:
        mode = stat.S_IMODE(os.fstat(dfd).st_mode)
        if mode & 0o300 == 0o300:
            return False
        os.fchmod(dfd, mode | 0o700)
    except OSError:
        return False
    return True


class _Dirs(DirHandles):
    """The destination's directories: a missing one is made in its parent with ``in_dir`` when that parent
    is the tree's top or below (never in the directories above it, which no rank gives their mode back)."""

    def _mkdir(self, parent: int, key: tuple[str, ...], mode: int) -> None:
        if len(key) > len(self.prefix):
            in_dir(parent, os.mkdir, key[-1], mode, dir_fd=parent)
        else:
            super()._mkdir(parent, key, mode)


def _split(path: bytes) -> tuple[str, ...]:
    return wire_parts(os.fsdecode(path))


def _check_name(name: bytes) -> None:
    if name in (b"", b".", b"..") or b"\0" in name:
        raise PathEscape(f"{name!r} is not a file name")


def _umask() -> int:
    """This process's umask, read without changing it (0o777, i.e. "always chmod", if unknown)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o777


class ChunkRefused(OSError):
    """A chunk's file cannot be written (e.g. permission denied) and none of its payload was read."""


def _fail(errors: list, path, exc: Exception) -> None:
    errors.append(PathError(path, f"{type(exc).__name__}: {exc}"))


class Destination:
    """The destination tree of one registered transfer, seen by one connection."""

    def __init__(self, root: Path, prefix: tuple[str, ...]):
        self.dirs = _Dirs(root, prefix)
        self._tmp_ids = itertools.count()
        self._tmp_tag = secrets.token_hex(4)
        self._manifest: list | None = None  # the walk's tree.Entry list, once page 0 is asked for
        self._starts: list[int] = []
        self._umask = _umask()
        self._unnamed = os.path.isdir("/proc/self/fd")  # O_TMPFILE files are published via /proc
        self._scratch = batchio.scratch()

    def close(self) -> None:
        """Release directory descriptors."""
        self.dirs.close()

    def _tmp_name(self) -> str:
        return f".cm.{self._tmp_tag}{next(self._tmp_ids):x}.tmp"

    def _parent(self, parts: tuple[str, ...], create: bool = False) -> int:
        if not parts:
            raise PathEscape("the top of the tree is not a file")
        return self.dirs.open(parts[:-1], create=create)

    # ---- reading the tree ----

    def manifest_page(self, page: int, page_bytes: int = 8 << 20) -> tuple[list, bool]:
        """Page ``page`` of the destination's entries, all of them (walked once per connection, on the request
        for page 0), the mover's own temporary files among them (``diff.split_temps``): the lead removes those
        no run resumes.

        Pages are cut and encoded as they are asked for (the sender asks for them in order): the mover holds
        the walk's entries (``tree.Entry``, ~250 bytes each with their strings), never a second copy of the
        whole manifest. No user pattern runs here: the sender leaves out what its excludes match.
        """
        if self._manifest is None or page == 0:
            try:
                top = self.dirs.open(())
            except (FileNotFoundError, NotADirectoryError):
                self._manifest = []
            else:
                self._manifest = walk_fd(top)  # with the mover's temporaries: the sender sorts them out
            self._starts = [0]  # where each page cut so far begins
        entries, starts = self._manifest, self._starts
        while len(starts) <= page + 1 and starts[-1] < len(entries):
            starts.append(_page_end(entries, starts[-1], page_bytes))
        if page + 1 >= len(starts):
            return [], False
        end = starts[page + 1]
        with no_collection():
            rows = [e.to_wire() for e in entries[starts[page]:end]]  # frames.EntryRow, as tuples
        return rows, end < len(entries)

    def partials(self, files: list[PartialRow]) -> list:
        """For each file: [[index, digest], ...] verified by an earlier run (``frames.VerifiedRow``).

        Only what its ``.part`` holds now counts: a sidecar of another inode
        counts for nothing, and each chunk it records is hashed again, the way
        its digest was made (whole, or a sparse chunk's map and data); one
        whose bytes differ is cleared, so it goes again.
        """
        out = []
        for row in files:
            try:
                out.append(self._verified(row))
            except (OSError, PathEscape):
                out.append([])
        return out

    def _verified(self, row: PartialRow) -> list:
        size, mtime, chunk_size = row.size, row.mtime, row.chunk_size
        parts = _split(row.path)
        dfd = self._parent(parts)
        part, ok = partial_names(parts[-1], size, mtime, chunk_size)
        try:
            fd = os.open(part, _READ, dir_fd=dfd)
        except FileNotFoundError:
            return []
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                return []
            rec = ChunkRecord.open(dfd, ok, size, mtime, chunk_size, st.st_ino, create=False)
            if rec is None:
                return []
            try:
                good = []
                for i, (digest, form) in sorted(rec.verified().items()):
                    offset = i * chunk_size
                    rehash = sparse.chunk_digest if form == SPARSE else checksum.chunk_digest
                    if rehash(fd, offset, min(chunk_size, size - offset)) == digest:
                        good.append([i, digest])
                    else:
                        rec.clear(i)
                return good
            finally:
                rec.close()
        finally:
            os.close(fd)

    def checksums(self, files: list[ChecksumRow]) -> list:
        """For each file: its chunk digests, or None if absent/different size."""
        out = []
        for row in files:
            size, chunk_size = row.size, row.chunk_size
            parts = _split(row.path)
            try:
                dfd = self._parent(parts)  # first: it refuses the top of the tree, which has no name
                fd = os.open(parts[-1], _READ, dir_fd=dfd)
            except (OSError, PathEscape):
                out.append(None)
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                    out.append(None)
                else:
                    out.append(checksum.file_digests(fd, size, chunk_size))
            except OSError:
                out.append(None)
            finally:
                os.close(fd)
        return out

    # ---- structure ----

    def mkdirs(self, dirs: list[DirRow]) -> list[PathError]:
        """Create each directory (parents first); a non-directory in the way is replaced."""
        errors: list = []
        for row in dirs:
            path = row.path
            parts = _split(path)
            try:
                fd = self._make_dir(parts)
                st = os.fstat(fd)
                if stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
                    os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)  # writable while we fill it
            except (OSError, PathEscape) as exc:
                _fail(errors, path, exc)
        return errors

    def _make_dir(self, parts: tuple[str, ...]) -> int:
        if not parts:
            return self.dirs.open((), create=True)
        dfd = self._parent(parts, create=True)
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            in_dir(dfd, os.unlink, name, dir_fd=dfd)
            self.dirs.forget(parts)
        return self.dirs.open(parts, create=True, mode=0o700)

    def delete(self, paths: list[bytes]) -> tuple[int, list[PathError]]:
        """Remove each path (directories with everything in them); returns (removed, errors)."""
        removed = 0
        errors: list = []
        for path in paths:
            parts = _split(path)
            try:
                dfd = self._parent(parts)
                name = parts[-1]
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    self.dirs.forget(parts)
                    dfd = self._parent(parts)
                    in_dir(dfd, shutil.rmtree, name, dir_fd=dfd)
                else:
                    in_dir(dfd, os.unlink, name, dir_fd=dfd)
                removed += 1
            except FileNotFoundError:
                continue
            except (OSError, PathEscape) as exc:
                _fail(errors, path, exc)
        return removed, errors

    def symlinks(self, links: list[LinkRow]) -> list[PathError]:
        """Create each symlink, replacing what is there."""
        errors: list = []
        for row in links:
            path, target, mtime = row.path, row.target, row.mtime
            parts = _split(path)
            if not target or b"\0" in target:
                _fail(errors, path, ValueError("bad symlink target"))
                continue
            try:
                dfd = self._parent(parts, create=True)
                tmp = self._tmp_name()
                in_dir(dfd, os.symlink, target, tmp, dir_fd=dfd)
                try:
                    os.utime(tmp, ns=(mtime, mtime), dir_fd=dfd, follow_symlinks=False)
                    self._publish(dfd, tmp, parts[-1])
                except OSError:
                    _unlink_quietly(dfd, tmp)
                    raise
            except (OSError, PathEscape) as exc:
                _fail(errors, path, exc)
        return errors

    def set_meta(self, files: list[MetaRow]) -> list[PathError]:
        """Set mode and mtime of each existing regular file."""
        errors: list = []
        for row in files:
            path, mode, mtime = row.path, row.mode, row.mtime
            parts = _split(path)
            try:
                dfd = self._parent(parts)  # first: it refuses the top of the tree, which has no name
                fd = os.open(parts[-1], _READ, dir_fd=dfd)
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise IsADirectoryError("not a regular file")
                    os.fchmod(fd, mode)
                    os.utime(fd, ns=(mtime, mtime))
                finally:
                    os.close(fd)
            except (OSError, PathEscape) as exc:
                _fail(errors, path, exc)
        return errors

    def dir_meta(self, dirs: list[MetaRow]) -> list[PathError]:
        """Set mode and mtime of each directory (done after its contents)."""
        errors: list = []
        for row in dirs:
            path, mode, mtime = row.path, row.mode, row.mtime
            parts = _split(path)
            try:
                fd = self.dirs.open(parts)
                os.fchmod(fd, mode)
                os.utime(fd, ns=(mtime, mtime))
            except (OSError, PathEscape) as exc:
                _fail(errors, path, exc)
        return errors

    def owners(self, entries: list[OwnerRow]) -> list[PathError]:
        """Give each entry its owner (never through a symlink); root's syncs only.

        A change of owner clears set-user-ID and set-group-ID bits, so a
        file or directory that has them gets its mode again afterwards.
        """
        errors: list = []
        for row in entries:
            path, uid, gid, mode = row.path, row.uid, row.gid, row.mode
            try:
                parts = _split(path)
                if parts:
                    dfd, name = self._parent(parts), parts[-1]
                    os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
                    if mode & 0o6000 and not stat.S_ISLNK(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                        os.chmod(name, mode, dir_fd=dfd)
                else:
                    fd = self.dirs.open(())
                    os.fchown(fd, uid, gid)
                    if mode & 0o6000:
                        os.fchmod(fd, mode)
            except (OSError, PathEscape) as exc:
                _fail(errors, path, exc)
        return errors

    # ---- file data ----

    def _publish(self, dfd: int, tmp, name) -> None:
        """Rename ``tmp`` over ``name`` in ``dfd``; an empty directory in the way is removed first."""
        try:
            in_dir(dfd, os.rename, tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except IsADirectoryError:
            # a non-empty directory stays, and the rename fails (ENOTEMPTY)
            in_dir(dfd, os.rmdir, name, dir_fd=dfd)
            self.dirs.forget_child(dfd, name)
            in_dir(dfd, os.rename, tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)

    def write_batch(self, files: list[BatchRow], data: memoryview) -> tuple[list[int], list[PathError]]:
        """Write small files packed in ``data``, one after another.

        Returns (indices whose checksum did not match, [path, error] list).
        Nothing is written for a file that does not match. A row with an owner
        (syncs that keep owners; the caller checks that this one may) is
        created with it.
        """
        offsets = [0]
        for f in files:
            offsets.append(offsets[-1] + f.size)
        if offsets[-1] != len(data):
            raise ValueError("batch sizes do not add up to the payload")
        split = [f.path.rpartition(b"/") for f in files]
        for parent, _, name in split:  # refuse the whole batch if any name is unsafe, before writing anything
            _split(parent)
            _check_name(name)
        digests = checksum.digest_many(data, offsets)
        bad = [i for i, f in enumerate(files) if digests[i] != f.digest]
        skip = set(bad)
        errors: list = []
        compiled = _Compiled(files, split, data, offsets, bad, self._umask) if self._unnamed and files else None
        for i, end in batchio.runs([parent for parent, _, _ in split]):  # files come sorted
            try:
                dfd = self.dirs.open(_split(split[i][0]), create=True)
            except (OSError, PathEscape) as exc:
                for k in range(i, end):
                    if k not in skip:
                        _fail(errors, files[k].path, exc)
                continue
            k = i
            while k < end:
                if compiled is not None and self._unnamed:
                    k = compiled.run(dfd, k, end, self._scratch)
                    if k == end:
                        break
                if k not in skip:  # this one in Python: it reports why, or takes the slow road
                    f = files[k]
                    try:
                        self._write_small(dfd, split[k][2], data[offsets[k]:offsets[k + 1]], f.mode, f.mtime,
                                          None if f.uid is None else (f.uid, f.gid))
                    except (OSError, PathEscape) as exc:
                        _fail(errors, f.path, exc)
                k += 1
        return bad, errors

    def _create(self, dfd: int, mode: int) -> tuple[int, bytes | None]:
        """A new file for data in directory ``dfd``: unnamed (O_TMPFILE) when possible, else a named temp.

        Returns (descriptor, temporary name or None for an unnamed file).
        """
        if self._unnamed:
            try:
                return in_dir(dfd, os.open, ".", _UNNAMED, mode & 0o777, dir_fd=dfd), None
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self._unnamed = False  # this filesystem cannot: name temporaries from now on
        tmp = os.fsencode(self._tmp_name())
        return in_dir(dfd, os.open, tmp, _NEW, mode & 0o777, dir_fd=dfd), tmp

    def _finish(self, dfd: int, fd: int, tmp: bytes | None, name: bytes, mode: int, mtime: int,
                owner: tuple[int, int] | None = None) -> None:
        """Set owner (syncs that keep owners), mode and mtime, close, and publish under ``name``
        atomically; never leaves a temp behind."""
        try:
            _stamp(fd, mode, mtime, owner, chmod=bool(mode & self._umask or mode > 0o777))
            if tmp is None:
                try:
                    in_dir(dfd, os.link, f"/proc/self/fd/{fd}", name, dst_dir_fd=dfd)
                    return
                except FileExistsError:
                    tmp = os.fsencode(self._tmp_name())  # something is there: replace it by rename
                    in_dir(dfd, os.link, f"/proc/self/fd/{fd}", tmp, dst_dir_fd=dfd)
                except OSError:
                    # /proc cannot link it here (restricted /proc?): copy into a named temp instead
                    self._unnamed = False
                    tmp = self._named_copy(dfd, fd, mode, mtime)
            self._publish(dfd, tmp, name)
        except OSError:
            if tmp is not None:
                _unlink_quietly(dfd, tmp)
            raise
        finally:
            os.close(fd)

    def _named_copy(self, dfd: int, fd: int, mode: int, mtime: int) -> bytes:
        tmp = os.fsencode(self._tmp_name())
        out = in_dir(dfd, os.open, tmp, _NEW, 0o600, dir_fd=dfd)
        try:
            st = os.fstat(fd)
            size, done = st.st_size, 0
            while done < size:
                n = os.copy_file_range(fd, out, size - done, done, done)
                if n == 0:
                    raise OSError(errno.EIO, "short copy")
                done += n
            made = os.fstat(out)
            owner = (st.st_uid, st.st_gid)  # the owner a sync that keeps owners gave it
            _stamp(out, mode, mtime, owner if owner != (made.st_uid, made.st_gid) else None)
        except OSError:
            os.close(out)
            _unlink_quietly(dfd, tmp)
            raise
        os.close(out)
        return tmp

    def _write_small(self, dfd: int, name: bytes, data: memoryview, mode: int, mtime: int,
                     owner: tuple[int, int] | None = None) -> None:
        fd, tmp = self._create(dfd, mode)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError:
            os.close(fd)
            if tmp is not None:
                _unlink_quietly(dfd, tmp)
            raise
        self._finish(dfd, fd, tmp, name, mode, mtime, owner)

    def receive_chunk(self, req: Chunk, channel, buf: memoryview,
                      owner: tuple[int, int] | None = None) -> tuple[bool, bool]:
        """Receive one streamed chunk from ``channel`` into its place; returns (verified, published).

        A one-chunk file goes to a fresh temporary file; chunks of a larger
        file go to the shared ``.part`` file and are recorded in its sidecar.
        ``owner`` (uid, gid), for syncs that keep owners, is given to the
        file before it is published (then its mode, which a chown may clear).
        """
        parts = _split(req.path)
        size, chunk_size, index = req.size, req.chunk_size, req.index
        mode, mtime = req.mode, req.mtime
        try:
            dfd = self._parent(parts, create=True)
        except OSError as exc:
            raise ChunkRefused(exc.errno, exc.strerror) from None
        length = min(chunk_size, size - index * chunk_size)
        if chunk_count(size, chunk_size) == 1:
            name = os.fsencode(parts[-1])
            try:
                fd, tmp = self._create(dfd, mode)
            except OSError as exc:
                raise ChunkRefused(exc.errno, exc.strerror) from None
            try:
                if req.extents is not None:
                    os.ftruncate(fd, size)  # a sparse file of one chunk: its size, holes included
                got, sent = self._receive(req, channel, fd, 0, length, buf)
            except BaseException:
                os.close(fd)
                if tmp is not None:
                    _unlink_quietly(dfd, tmp)
                raise
            if got != sent:
                os.close(fd)
                if tmp is not None:
                    _unlink_quietly(dfd, tmp)
                return False, False
            self._finish(dfd, fd, tmp, name, mode, mtime, owner)
            return True, True
        part, ok = partial_names(parts[-1], size, mtime, chunk_size)
        try:
            fd = _open_part(dfd, part)
        except OSError as exc:
            raise ChunkRefused(exc.errno, exc.strerror) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(f"{part} is not a regular file")
            try:
                if st.st_size != size:
                    if req.extents is None:
                        _reserve(fd, st.st_dev, size)
                    else:
                        os.ftruncate(fd, size)  # a sparse file: reserving would fill its holes
            except OSError as exc:  # no room for it: nothing of the payload read yet
                _unlink_quietly(dfd, part)
                raise ChunkRefused(exc.errno, exc.strerror) from None
            try:
                got, sent = self._receive(req, channel, fd, index * chunk_size, length, buf)
            except OSError as exc:
                if exc.errno in NO_ROOM:  # it cannot be finished here: give its room back, keep nothing of it
                    _unlink_quietly(dfd, part)
                    _unlink_quietly(dfd, ok)
                raise
            if got != sent:
                return False, False
            rec = in_dir(dfd, ChunkRecord.open, dfd, ok, size, mtime, chunk_size, st.st_ino, create=True)
            try:
                rec.mark(index, got, WHOLE if req.extents is None else SPARSE)
                for k in range(index + 1, index + 1 + req.holes_after):  # all hole: nothing to receive
                    rec.mark(k, sparse.HOLE_DIGEST, SPARSE)
                if not rec.complete():
                    return True, False
            finally:
                rec.close()
            lock(fd, fcntl.LOCK_EX)  # once no other writer is inside it
            if not _is_named(dfd, part, fd):
                return True, True  # another receiver published it meanwhile (this chunk in it: we held the lock)
            _stamp(fd, mode, mtime, owner)
            try:
                self._publish(dfd, part, parts[-1])
            except FileNotFoundError:
                pass  # another receiver published it first
            _unlink_quietly(dfd, ok)
            return True, True
        finally:
            os.close(fd)


    @staticmethod
    def _receive(req: Chunk, channel, fd: int, offset: int, length: int, buf: memoryview) -> tuple[int, int]:
        """A chunk's payload into ``fd`` at ``offset``: whole, or a sparse file's data extents alone."""
        if req.extents is None:
            return channel.recv_stream_to_fd(fd, offset, length, buf, checksum.Hasher())
        return sparse.receive(channel, fd, offset, req.extents, buf)


class _Compiled:
    """A batch of small files laid out for ``batchio.publish_run``."""

    def __init__(self, files: list[BatchRow], split: list, data: memoryview, offsets: list, bad: list, umask: int):
        n = len(files)
        self.names, self.name_off = batchio.pack_names([name for _, _, name in split])
        self.data = np.frombuffer(data, dtype=np.uint8) if len(data) else np.zeros(0, dtype=np.uint8)
        self.data.flags.writeable = False  # read-only like the names: one compiled variant for every caller
        self.data_off = np.asarray(offsets, dtype=np.int64)
        self.modes = np.fromiter((f.mode for f in files), dtype=np.uint32, count=n)
        self.owners = np.array([(-1, -1) if f.uid is None else (f.uid, f.gid) for f in files],
                               dtype=np.int64).reshape(n, 2)
        # modes > 0o777 (set-ID bits, which a change of owner clears) are set again after the owner
        self.chmod = ((self.modes & umask) != 0) | (self.modes > 0o777)
        self.mtimes = np.fromiter((f.mtime for f in files), dtype=np.int64, count=n)
        self.skip = np.zeros(n, dtype=np.bool_)
        self.skip[bad] = True

    def run(self, dfd: int, start: int, stop: int, work: np.ndarray) -> int:
        return batchio.publish_run(dfd, self.names, self.name_off, self.data, self.data_off, self.modes,
                                   self.chmod, self.owners, self.mtimes, self.skip, start, stop, work)


def _page_end(entries: list, start: int, page_bytes: int) -> int:
    """Where the manifest page that begins at ``start`` ends: past ``page_bytes`` of names (counted in
    characters, at most 4 bytes each: a page stays well under a frame's 64 MiB) and fields."""
    size = 0
    for i in range(start, len(entries)):
        e = entries[i]
        size += len(e.path) + len(e.target) + 40
        if size > page_bytes and i > start:
            return i
    return len(entries)


def _stamp(fd: int, mode: int, mtime: int, owner: tuple[int, int] | None = None, chmod: bool = True) -> None:
    """Give an open file its owner (syncs that keep owners), mode and mtime, in that order: a change of
    owner clears set-ID bits, so the mode comes after it."""
    if owner is not None:
        os.fchown(fd, *owner)
    if chmod:
        os.fchmod(fd, mode)
    os.utime(fd, ns=(mtime, mtime))


def _open_part(dfd: int, part: str) -> int:
    """The ``.part`` file, open for writing and locked shared: the receivers writing chunks into it share
    it, the one that publishes it takes it alone. One published or replaced between the open and the lock
    is opened again by name, so nothing is ever written into a file once it is published."""
    for _ in range(3):
        fd = in_dir(dfd, os.open, part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            lock(fd, fcntl.LOCK_SH)
            if _is_named(dfd, part, fd):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OSError(errno.EAGAIN, f"{part} keeps being replaced")


def _is_named(dfd: int, name: str, fd: int) -> bool:
    """Whether ``name`` in ``dfd`` is still the file open as ``fd``."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)


def _unlink_quietly(dfd: int, name: str) -> None:
    try:
        in_dir(dfd, os.unlink, name, dir_fd=dfd)
    except FileNotFoundError:
        pass



def _reserve(fd: int, dev: int, size: int) -> None:
    """Give a file being received its size. On disk its blocks are reserved at once (no
    ENOSPC halfway, contiguous extents); in memory file systems reserving means zeroing
    every page before it is written over, a whole extra pass, so the file only grows."""
    if dev not in _memory_devices:
        _memory_devices[dev] = _fs_type(fd) in _MEMORY_FS
    if not _memory_devices[dev]:
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno in NO_ROOM:
                raise
    os.ftruncate(fd, size)


def _fs_type(fd: int) -> int:
    """statfs's f_type of the file system holding fd (Linux), or 0 when unknown."""
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux; f_type comes first
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.fstatfs(fd, buf) != 0:
            return 0
    except (OSError, AttributeError):
        return 0
    return int.from_bytes(buf.raw[:ctypes.sizeof(ctypes.c_long)], sys.byteorder)
