"""Small files of a batch written by compiled code, without the GIL.

A receiver connection spends most of a batch of small files in six system
calls per file. Made from Python, each of them gives the GIL back and takes
it again, so the connections of a transfer wait on each other instead of
writing in parallel. ``publish_run`` makes those calls from numba-compiled
code for a run of files in one directory: for each file an unnamed
``O_TMPFILE`` file, its data, its mode (when the umask would change it) and
mtime, then ``linkat`` under its name. It stops at the first file it cannot
finish, leaving nothing of it behind, and returns that file's index: the
caller does that one file in Python, which reports the error or takes the
slow road (the name is taken, the filesystem has no ``O_TMPFILE``), and
calls again for the rest.

libc's functions are bound by name (``ExternalFunction``), so the compiled
code is cached on disk like the checksums.
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit, types

from . import checksum  # noqa: F401  (chooses numba's cache directory before anything is compiled)

_openat = types.ExternalFunction("openat", types.int32(types.int32, types.intp, types.int32, types.uint32))
_write = types.ExternalFunction("write", types.intp(types.int32, types.intp, types.uintp))
_fchmod = types.ExternalFunction("fchmod", types.int32(types.int32, types.uint32))
_futimens = types.ExternalFunction("futimens", types.int32(types.int32, types.intp))
_linkat = types.ExternalFunction("linkat", types.int32(types.int32, types.intp, types.int32, types.intp, types.int32))
_close = types.ExternalFunction("close", types.int32(types.int32))

_UNNAMED = os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
_PROC_FD = b"/proc/self/fd/"


@njit(cache=True, nogil=True)
def _publish_run(dfd, names, name_off, data, data_off, modes, chmod, mtimes, skip, start, stop, scratch):
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


def scratch() -> np.ndarray:
    """Per-thread working memory for ``publish_run``."""
    buf = np.zeros(96, dtype=np.uint8)
    buf[0] = ord(".")
    buf[40:40 + len(_PROC_FD)] = np.frombuffer(_PROC_FD, dtype=np.uint8)
    return buf


def publish_run(dfd: int, names: np.ndarray, name_off: np.ndarray, data: np.ndarray, data_off: np.ndarray,
                modes: np.ndarray, chmod: np.ndarray, mtimes: np.ndarray, skip: np.ndarray,
                start: int, stop: int, work: np.ndarray) -> int:
    """Create files ``start``..``stop-1`` in directory ``dfd``; returns the first index not done.

    File i is named ``names[name_off[i]:]`` (NUL-terminated), holds
    ``data[data_off[i]:data_off[i+1]]``, gets ``modes[i]`` (by ``fchmod``
    when ``chmod[i]``) and ``mtimes[i]`` (ns); files with ``skip[i]`` set
    are left out. ``names`` and ``data`` are read-only arrays (one compiled
    variant serves every caller); ``work`` comes from ``scratch()``, one
    per thread.
    """
    return int(_publish_run(dfd, names, name_off, data, data_off, modes, chmod, mtimes, skip, start, stop, work))


def warm_up() -> None:
    """Load the compiled code now (from numba's cache, or compile it once)."""
    empty = np.zeros(1, dtype=np.int64)
    nothing = np.frombuffer(b"\0", dtype=np.uint8)  # names and data are read-only arrays
    publish_run(-1, nothing, empty, nothing, empty, np.zeros(0, np.uint32), np.zeros(0, np.bool_),
                np.zeros(0, np.int64), np.zeros(0, np.bool_), 0, 0, scratch())
