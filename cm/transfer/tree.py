"""Walking a tree into a sorted list of entries (leaving out what ``excludes.Excluder`` excludes).

Both ends walk the same way: directories are opened relative to their
parent's descriptor with ``O_NOFOLLOW`` and symlinks are recorded, never
followed. Paths are ``/``-joined, relative to the top of the tree (``""`` is
the top itself), and sorted, so every rank of a sync job that walks the same
source gets the same list.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .excludes import Excluder

FILE = "f"
DIR = "d"
LINK = "l"

TEMP_PREFIX = ".cm."  # the mover's own temporary and state files start with this
TEMP_SUFFIXES = (".tmp", ".part", ".ok")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Entry(NamedTuple):
    """One thing in a tree: a regular file, a directory or a symlink (a tuple: cheap by the million)."""

    path: str
    kind: str
    size: int
    mtime_ns: int
    mode: int  # permission bits only
    target: str = ""  # symlink target, verbatim
    uid: int = -1  # owner, so a sync that keeps owners sets only those that differ
    gid: int = -1

    def to_wire(self) -> list:
        """A manifest row (``frames.EntryRow``): names as raw bytes."""
        return [os.fsencode(self.path), self.kind, self.size, self.mtime_ns, self.mode, os.fsencode(self.target),
                self.uid, self.gid]

    @classmethod
    def from_wire(cls, row) -> "Entry":
        """Inverse of ``to_wire``, from a decoded ``frames.EntryRow``."""
        return _make(cls, (os.fsdecode(row.path), row.kind, row.size, row.mtime, row.mode, os.fsdecode(row.target),
                           row.uid, row.gid))


_make = tuple.__new__  # builds an Entry without the generated __new__'s overhead (walks make millions)


def is_temp_name(name: str) -> bool:
    """True for the mover's own temporary/state files, which walks leave out."""
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIXES)


def _entry(path: str, st: os.stat_result, target: str = "") -> Entry | None:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        kind = FILE
    elif stat.S_ISDIR(mode):
        kind = DIR
    elif stat.S_ISLNK(mode):
        kind = LINK
    else:
        return None  # devices, fifos and sockets are not copied
    size = st.st_size if kind == FILE else 0
    return Entry(path, kind, size, st.st_mtime_ns, stat.S_IMODE(mode), target, st.st_uid, st.st_gid)


def walk_fd(top_fd: int, excluder: Excluder | None = None, skip_temp: bool = False) -> list[Entry]:
    """Walk the directory open as ``top_fd``; returns sorted entries, top (``""``) first.

    Does not close ``top_fd``. Subdirectories that vanish or cannot be
    opened while walking are recorded but not entered.
    """
    excluder = excluder if excluder else None
    entries = [_entry("", os.stat(top_fd))]
    append = entries.append
    stack: list[tuple[str, int]] = [("", os.dup(top_fd))]
    while stack:
        prefix, fd = stack.pop()
        try:
            with os.scandir(fd) as it:
                for de in it:
                    name = de.name
                    if skip_temp and name.startswith(TEMP_PREFIX) and is_temp_name(name):
                        continue
                    path = prefix + name
                    try:
                        st = de.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    fmt = stat.S_IFMT(st.st_mode)
                    size, target = 0, ""
                    if fmt == stat.S_IFREG:
                        kind, size = FILE, st.st_size
                    elif fmt == stat.S_IFDIR:
                        kind = DIR
                    elif fmt == stat.S_IFLNK:
                        kind = LINK
                    else:
                        continue  # devices, fifos and sockets are not copied
                    if excluder is not None and excluder.excluded(path, kind == DIR):
                        continue
                    if kind == LINK:
                        try:
                            target = os.readlink(name, dir_fd=fd)
                        except FileNotFoundError:
                            continue
                    append(_make(Entry, (path, kind, size, st.st_mtime_ns, st.st_mode & 0o7777, target, st.st_uid,
                                         st.st_gid)))
                    if kind == DIR:
                        try:
                            sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                        except (FileNotFoundError, NotADirectoryError, PermissionError):
                            continue
                        stack.append((path + "/", sub))
        finally:
            os.close(fd)
    entries.sort(key=lambda e: e.path)
    return entries


def walk(top: str | os.PathLike, excluder: Excluder | None = None, skip_temp: bool = False) -> list[Entry]:
    """Walk ``top``: a directory gives its tree; a regular file gives one entry named by its basename.

    Returns [] when ``top`` does not exist.
    """
    try:
        st = os.lstat(top)
    except FileNotFoundError:
        return []
    if stat.S_ISREG(st.st_mode):
        e = _entry(os.path.basename(os.fspath(top)), st)
        return [e] if e else []
    fd = os.open(top, _DIR_FLAGS)
    try:
        return walk_fd(fd, excluder, skip_temp)
    finally:
        os.close(fd)
