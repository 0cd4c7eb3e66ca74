"""Small files of a batch read and written by compiled code, without the GIL.

A receiver connection spends most of a batch of small files in six system
calls per file. Made from Python, each of them gives the GIL back and takes
it again, so the connections of a transfer wait on each other instead of
writing in parallel. ``publish_run`` makes those calls from numba-compiled
code for a run of files in one directory: for each file an unnamed
``O_TMPFILE`` file, its data, its owner (syncs that keep owners), its mode
(when the umask or the owner would change it) and mtime, then ``linkat``
under its name. It stops at the first file it cannot
finish, leaving nothing of it behind, and returns that file's index: the
caller does that one file in Python, which reports the error or takes the
slow road (the name is taken, the filesystem has no ``O_TMPFILE``), and
calls again for the rest.

On the sending side ``read_run`` does the same for reading: open each file
(never through a symlink), check it is still the regular file of the size
and mtime the walk saw (``statx``, whose layout is the same on every
architecture), and read it into its place in the batch.

Walks stat every name of a directory with ``stat_names`` (``statx`` from
compiled code, and the size of its list of extended attributes when the
walk lists them): the stat calls, not Python, are then what a walk of a big
tree costs.

libc's functions are bound by name (``ExternalFunction``), so the compiled
code is cached on disk like the checksums.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from . import jit  # noqa: F401, I001  (chooses numba's cache directory: before numba is imported)

import numpy as np  # noqa: E402
from numba import njit, types  # noqa: E402

_openat = types.ExternalFunction("openat", types.int32(types.int32, types.intp, types.int32, types.uint32))
_write = types.ExternalFunction("write", types.intp(types.int32, types.intp, types.uintp))
_fchmod = types.ExternalFunction("fchmod", types.int32(types.int32, types.uint32))
_fchown = types.ExternalFunction("fchown", types.int32(types.int32, types.uint32, types.uint32))
_futimens = types.ExternalFunction("futimens", types.int32(types.int32, types.intp))
_linkat = types.ExternalFunction("linkat", types.int32(types.int32, types.intp, types.int32, types.intp, types.int32))
_close = types.ExternalFunction("close", types.int32(types.int32))
_read = types.ExternalFunction("read", types.intp(types.int32, types.intp, types.uintp))
_statx = types.ExternalFunction("statx", types.int32(types.int32, types.intp, types.int32, types.uint32, types.intp))
_llistxattr = types.ExternalFunction("llistxattr", types.intp(types.intp, types.intp, types.uintp))

_SOURCE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_AT_EMPTY_PATH = 0x1000
_STATX_WANTED = 0x1 | 0x2 | 0x40 | 0x200  # type, mode, mtime, size
# struct statx: stx_mask u32 @0, stx_mode u16 @0x1c, stx_size u64 @0x28, stx_mtime {i64, u32} @0x70
_STX_MODE, _STX_SIZE, _STX_MTIME = 0x1C, 0x28, 0x70
_S_IFMT, _S_IFREG = 0o170000, 0o100000

_AT_SYMLINK_NOFOLLOW = 0x100
# type, mode, nlink, uid, gid, mtime, ino, size (stx_rdev and stx_dev are always filled)
_STATX_ENTRY = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x40 | 0x100 | 0x200
# struct statx: stx_nlink u32 @0x10, stx_uid u32 @0x14, stx_gid u32 @0x18, stx_ino u64 @0x20,
# stx_rdev_major, stx_rdev_minor, stx_dev_major, stx_dev_minor u32 @0x80..0x8c
_STX_NLINK, _STX_UID, _STX_GID, _STX_INO, _STX_RDEV, _STX_DEV = 0x10, 0x14, 0x18, 0x20, 0x80, 0x88
_STX_BUF = 256  # bytes of a struct statx
# the columns of stat_names' rows
MODE, SIZE, MTIME, UID, GID, NLINK, INO, DEV, RDEV, XATTRS = range(10)

_UNNAMED = os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
_PROC_FD = b"/proc/self/fd/"


def pack_names(names: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The names NUL-terminated in one read-only array, and the offset of each."""
    packed = np.frombuffer(b"\0".join(names) + b"\0", dtype=np.uint8)
    offsets = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum([len(name) + 1 for name in names], out=offsets[1:])
    return packed, offsets


def runs(parents: list) -> Iterator[tuple[int, int]]:
    """(start, stop) of each run of equal consecutive parents: the files of a sorted batch, per directory."""
    i, n = 0, len(parents)
    while i < n:
        stop = i + 1
        while stop < n and parents[stop] == parents[i]:
            stop += 1
        yield i, stop
        i = stop


@njit(cache=True, nogil=True)
def _publish_run(dfd, names, name_off, data, data_off, modes, chmod, owners, mtimes, skip, start, stop, scratch):
    """Write files start..stop-1 (``skip`` set: leave out); returns the index of the first one not done."""
    dot = scratch[0:2]  # ".\0"
    times = scratch[8:40].view(np.int64)  # two struct timespec
    link = scratch[40:]  # "/proc/self/fd/" then the descriptor's digits
    base = 14
    for i in range(start, stop):
        if skip[i]:
            continue
        fd = _openat(dfd, dot.ctypes.data, _UNNAMED, modes[i] & 0o777)
        if fd < 0:
            return i
        pos, end = data_off[i], data_off[i + 1]
        while pos < end:
            n = _write(fd, data.ctypes.data + pos, end - pos)
            if n <= 0:
                _close(fd)
                return i
            pos += n
        if owners[i, 0] >= 0 and _fchown(fd, owners[i, 0], owners[i, 1]) != 0:
            _close(fd)
            return i
        if chmod[i] and _fchmod(fd, modes[i]) != 0:
            _close(fd)
            return i
        times[0] = mtimes[i] // 1000000000
        times[1] = mtimes[i] % 1000000000
        times[2] = times[0]
        times[3] = times[1]
        if _futimens(fd, times.ctypes.data) != 0:
            _close(fd)
            return i
        digits = 1
        v = fd
        while v >= 10:
            v //= 10
            digits += 1
        v = fd
        for k in range(digits - 1, -1, -1):
            link[base + k] = 48 + v % 10
            v //= 10
        link[base + digits] = 0
        done = _linkat(_AT_FDCWD, link.ctypes.data, dfd, names.ctypes.data + name_off[i], _AT_SYMLINK_FOLLOW)
        _close(fd)
        if done != 0:
            return i
    return stop


@njit(cache=True, nogil=True)
def _read_run(dfd, names, name_off, sizes, mtimes, buf, buf_off, ok, start, stop, stx):
    """Read files start..stop-1 into buf[buf_off[i]:]; ok[i] tells which were read whole and unchanged."""
    empty = stx[0:8]  # "" for statx on the descriptor itself (AT_EMPTY_PATH); stx[8:] is the struct
    info = stx[8:]
    for i in range(start, stop):
        ok[i] = False
        fd = _openat(dfd, names.ctypes.data + name_off[i], _SOURCE, 0)
        if fd < 0:
            continue
        if _statx(fd, empty.ctypes.data, _AT_EMPTY_PATH, _STATX_WANTED, info.ctypes.data) != 0:
            _close(fd)
            continue
        mode = np.int64(info[_STX_MODE]) | (np.int64(info[_STX_MODE + 1]) << 8)
        size = info[_STX_SIZE:_STX_SIZE + 8].view(np.int64)[0]
        sec = info[_STX_MTIME:_STX_MTIME + 8].view(np.int64)[0]
        nsec = info[_STX_MTIME + 8:_STX_MTIME + 12].view(np.uint32)[0]
        if (mode & _S_IFMT) != _S_IFREG or size != sizes[i] or sec * 1000000000 + nsec != mtimes[i]:
            _close(fd)
            continue
        pos, end = buf_off[i], buf_off[i] + sizes[i]
        while pos < end:
            n = _read(fd, buf.ctypes.data + pos, end - pos)
            if n <= 0:
                break
            pos += n
        _close(fd)
        ok[i] = pos == end


def read_run(dfd: int, names: np.ndarray, name_off: np.ndarray, sizes: np.ndarray, mtimes: np.ndarray,
             buf: np.ndarray, buf_off: np.ndarray, ok: np.ndarray, start: int, stop: int, work: np.ndarray) -> None:
    """Read files ``start``..``stop-1`` of directory ``dfd`` into ``buf`` at ``buf_off[i]``.

    ``ok[i]`` is set for a file read whole that is still a regular file of
    ``sizes[i]`` bytes and mtime ``mtimes[i]`` (ns); the caller reads any
    other again in Python to learn why. ``names`` is read-only (as for
    ``publish_run``), ``buf`` is writable; ``work`` comes from ``stat_scratch()``.
    """
    _read_run(dfd, names, name_off, sizes, mtimes, buf, buf_off, ok, start, stop, work)


@njit(cache=True, inline="always")
def _u32(buf, at):
    return np.int64(buf[at:at + 4].view(np.uint32)[0])


@njit(cache=True, inline="always")
def _makedev(major, minor):
    """glibc's makedev: what os.stat gives as st_dev and st_rdev."""
    return ((major & 0xFFFFF000) << 32) | ((major & 0xFFF) << 8) | ((minor & 0xFFFFFF00) << 12) | (minor & 0xFF)


@njit(cache=True, nogil=True)
def _stat_names(dfd, names, name_off, out, stx, xattrs):
    """out[i] = the stat_names row of name i; out[i, MODE] is -1 when statx failed."""
    for i in range(len(name_off)):
        name = names.ctypes.data + name_off[i]
        if _statx(dfd, name, _AT_SYMLINK_NOFOLLOW, _STATX_ENTRY, stx.ctypes.data) != 0:
            out[i, MODE] = -1
            continue
        out[i, MODE] = np.int64(stx[_STX_MODE]) | (np.int64(stx[_STX_MODE + 1]) << 8)
        out[i, SIZE] = stx[_STX_SIZE:_STX_SIZE + 8].view(np.int64)[0]
        out[i, MTIME] = stx[_STX_MTIME:_STX_MTIME + 8].view(np.int64)[0] * 1000000000 + _u32(stx, _STX_MTIME + 8)
        out[i, UID] = _u32(stx, _STX_UID)
        out[i, GID] = _u32(stx, _STX_GID)
        out[i, NLINK] = _u32(stx, _STX_NLINK)
        out[i, INO] = stx[_STX_INO:_STX_INO + 8].view(np.int64)[0]
        out[i, DEV] = _makedev(_u32(stx, _STX_DEV), _u32(stx, _STX_DEV + 4))
        out[i, RDEV] = _makedev(_u32(stx, _STX_RDEV), _u32(stx, _STX_RDEV + 4))
        # the bytes of its attributes' names (relative to the working directory: the caller is in dfd)
        out[i, XATTRS] = _llistxattr(name, 0, 0) if xattrs else 0


def stat_names(dfd: int, names: list[str], encoding: str, xattrs: bool = False) -> list[list[int]]:
    """Rows of [mode, size, mtime_ns, uid, gid, nlink, ino, dev, rdev, xattrs] (``MODE``...``XATTRS``) of
    each name in directory ``dfd``, symlinks not followed; mode is -1 where ``statx`` failed (the caller
    asks ``os.stat`` why). With ``xattrs`` the caller's working directory must be ``dfd``: the last
    column is then the size of the name's list of extended attributes (``llistxattr``: 0 for none, -1
    when it failed: ``os.listxattr`` says why); otherwise 0. Names hold no NUL: one join packs them all.
    """
    if not names:
        return []
    packed = np.frombuffer(("\0".join(names) + "\0").encode(encoding, "surrogateescape"), dtype=np.uint8)
    ends = np.flatnonzero(packed == 0)
    offsets = np.empty(len(ends), dtype=np.int64)
    offsets[0] = 0
    offsets[1:] = ends[:-1] + 1
    out = np.empty((len(names), XATTRS + 1), dtype=np.int64)
    _stat_names(dfd, packed, offsets, out, np.zeros(_STX_BUF, dtype=np.uint8), xattrs)
    return out.tolist()


def stat_scratch() -> np.ndarray:
    """Per-thread working memory for ``read_run``: an empty name and a struct statx."""
    return np.zeros(8 + 256, dtype=np.uint8)


def scratch() -> np.ndarray:
    """Per-thread working memory for ``publish_run``."""
    buf = np.zeros(96, dtype=np.uint8)
    buf[0] = ord(".")
    buf[40:40 + len(_PROC_FD)] = np.frombuffer(_PROC_FD, dtype=np.uint8)
    return buf


def publish_run(dfd: int, names: np.ndarray, name_off: np.ndarray, data: np.ndarray, data_off: np.ndarray,
                modes: np.ndarray, chmod: np.ndarray, owners: np.ndarray, mtimes: np.ndarray, skip: np.ndarray,
                start: int, stop: int, work: np.ndarray) -> int:
    """Create files ``start``..``stop-1`` in directory ``dfd``; returns the first index not done.

    File i is named ``names[name_off[i]:]`` (NUL-terminated), holds
    ``data[data_off[i]:data_off[i+1]]``, gets the owner ``owners[i]`` (uid, gid;
    left as created when uid is -1), ``modes[i]`` (by ``fchmod`` when
    ``chmod[i]``, after the owner, which may clear set-ID bits) and
    ``mtimes[i]`` (ns); files with ``skip[i]`` set
    are left out. ``names`` and ``data`` are read-only arrays (one compiled
    variant serves every caller); ``work`` comes from ``scratch()``, one
    per thread.
    """
    return int(_publish_run(dfd, names, name_off, data, data_off, modes, chmod, owners, mtimes, skip, start, stop,
                            work))


def warm_up_writing() -> None:
    """Load ``publish_run`` now (the receiver's half), from numba's cache or compiled once. Not ``stat_names``:
    the mover's first walk loads it, so a mover started again answers its node as soon as before."""
    empty = np.zeros(1, dtype=np.int64)
    nothing = np.frombuffer(b"\0", dtype=np.uint8)  # names and data are read-only arrays
    publish_run(-1, nothing, empty, nothing, empty, np.zeros(0, np.uint32), np.zeros(0, np.bool_),
                np.zeros((0, 2), np.int64), np.zeros(0, np.int64), np.zeros(0, np.bool_), 0, 0, scratch())


def warm_up_reading() -> None:
    """Load ``read_run`` now (the sender's half)."""
    none = np.zeros(0, dtype=np.int64)
    read_run(-1, np.frombuffer(b"\0", dtype=np.uint8), np.zeros(1, np.int64), none, none,
             np.zeros(1, dtype=np.uint8), none, np.zeros(0, np.bool_), 0, 0, stat_scratch())
    warm_up_walking()


def warm_up_walking() -> None:
    """Load ``stat_names`` now (the sender's warm-up; a mover loads it on its first walk)."""
    stat_names(-1, ["x"], "utf-8")
