"""Walking a tree into a sorted list of entries (leaving out what ``excludes.Excluder`` excludes).

Both ends walk the same way: directories are opened relative to their
parent's descriptor with ``O_NOFOLLOW`` and symlinks are recorded, never
followed. Paths are ``/``-joined, relative to the top of the tree (``""`` is
the top itself), and sorted, so every rank of a sync job that walks the same
source gets the same list.
"""

from __future__ import annotations

import errno
import gc
import os
import re
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .excludes import Excluder

FILE = "f"
DIR = "d"
LINK = "l"
FIFO = "p"
SOCKET = "s"
CHAR = "c"
BLOCK = "b"
SPECIAL = {stat.S_IFIFO: FIFO, stat.S_IFSOCK: SOCKET, stat.S_IFCHR: CHAR, stat.S_IFBLK: BLOCK}
DEVICES = (CHAR, BLOCK)

TEMP_PREFIX = ".cm."  # the mover's own temporary and state files start with this
# their exact names (destination.Destination._tmp_name, partial.partial_names): nothing else is cm's
_TEMP_NAME = re.compile(r"\.cm\.(?:[0-9a-f]{20}\.(?:part|ok)|[0-9a-f]{9,}\.tmp)")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Entry(NamedTuple):
    """One thing in a tree: a regular file, a directory, a symlink, a fifo, a socket or a device
    (a tuple: cheap by the million)."""

    path: str
    kind: str
    size: int  # a device's: its device number (st_rdev)
    mtime_ns: int
    mode: int  # permission bits only
    target: str = ""  # symlink target, verbatim
    uid: int = -1  # owner, so a sync that keeps owners sets only those that differ
    gid: int = -1

    def to_wire(self) -> tuple:
        """A manifest row (``frames.EntryRow``): names as raw bytes (``os.fsencode``, inlined: manifests
        hold millions)."""
        path, kind, size, mtime_ns, mode, target, uid, gid = self
        return (path.encode(_FS, "surrogateescape"), kind, size, mtime_ns, mode,
                target.encode(_FS, "surrogateescape") if target else b"", uid, gid)

    @classmethod
    def from_wire(cls, row) -> "Entry":
        """Inverse of ``to_wire``, from a decoded ``frames.EntryRow``."""
        return _make(cls, (row.path.decode(_FS, "surrogateescape"), row.kind, row.size, row.mtime, row.mode,
                           row.target.decode(_FS, "surrogateescape") if row.target else "", row.uid, row.gid))


_make = tuple.__new__  # builds an Entry without the generated __new__'s overhead (walks make millions)
_FS = sys.getfilesystemencoding()  # what os.fsencode and os.fsdecode use, with "surrogateescape"


def is_temp_name(name: str) -> bool:
    """True for exactly the names of the mover's own temporary/state files, which walks leave out
    (a user's ``.cm.notes.tmp`` is the user's file and is copied like any other)."""
    return name.startswith(TEMP_PREFIX) and _TEMP_NAME.fullmatch(name) is not None


def _entry(path: str, st: os.stat_result, target: str = "") -> Entry | None:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        kind = FILE
    elif stat.S_ISDIR(mode):
        kind = DIR
    elif stat.S_ISLNK(mode):
        kind = LINK
    else:
        kind = SPECIAL.get(stat.S_IFMT(mode))
        if kind is None:
            return None
    size = st.st_size if kind == FILE else st.st_rdev if kind in DEVICES else 0
    return Entry(path, kind, size, st.st_mtime_ns, stat.S_IMODE(mode), target, st.st_uid, st.st_gid)


def walk_fd(top_fd: int, excluder: Excluder | None = None, skip_temp: bool = False,
            inodes: dict | None = None, unreadable: list | None = None, xattrs: dict | None = None) -> list[Entry]:
    """Walk the directory open as ``top_fd``; returns sorted entries, top (``""``) first.

    Does not close ``top_fd``. Subdirectories that vanish or cannot be
    opened while walking are recorded but not entered. ``inodes``, if
    given, gets (st_dev, st_ino) of each regular file with other names
    (st_nlink > 1), by path: the hard links (``meta.link_groups``).
    ``unreadable``, if given, gets (path, reason) of each directory that
    could not be entered, so what is in it can be reported as not copied.
    ``xattrs``, if given, gets the names of the extended attributes of each
    entry that has any (or the OSError that listing them raised), by path.
    Every name is looked at from compiled code (``batchio.stat_names``:
    statx, and with ``xattrs`` the size of its attribute list), so only the
    entries that have attributes cost Python a listing. The size is asked
    with a name relative to the working directory (a third of the cost of
    one with the whole path), so the walk then moves the process's working
    directory into each directory it lists (and back at the end): only for
    a single-threaded caller (the sender, before its streams start).
    The cyclic garbage collector is off while it walks (``no_collection``).
    """
    with no_collection():
        return _walk_from(top_fd, excluder if excluder else None, skip_temp, inodes, unreadable, xattrs)


@contextmanager
def no_collection() -> Iterator[None]:
    """The cyclic garbage collector off for a while: making an object per entry of a big tree (none of
    them cyclic) set off collections that doubled a walk's time in the mover (which keeps it on).
    Another thread's ``no_collection`` may turn it back on before this one ends: that costs time only."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _walk_from(top_fd: int, excluder, skip_temp: bool, inodes, unreadable, xattrs) -> list[Entry]:
    entries = [_entry("", os.stat(top_fd))]
    stack: list[tuple[str, int]] = [("", os.dup(top_fd))]
    home = None
    if xattrs is not None:
        home = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        _list_xattrs(xattrs, "", top_fd)
    try:
        _walk(stack, entries, excluder, skip_temp, inodes, unreadable, xattrs)
    finally:
        if home is not None:
            os.fchdir(home)
            os.close(home)
    entries.sort(key=lambda e: e.path)
    return entries


def _list_xattrs(out: dict, path: str, name: str | int) -> None:
    try:
        names = os.listxattr(name) if isinstance(name, int) else os.listxattr(name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.ENOENT):
            out[path] = exc
        return
    if names:
        out[path] = names


def _walk(stack: list, entries: list, excluder, skip_temp: bool, inodes, unreadable, xattrs) -> None:
    from .batchio import stat_names  # compiled: not at import time (the head checks patterns with this module)

    append = entries.append
    while stack:
        prefix, fd = stack.pop()
        listing = xattrs
        try:
            if listing is not None:
                try:
                    os.fchdir(fd)  # stat_names lists attributes by the name relative to it
                except OSError as exc:  # no search permission: neither can its entries be looked at
                    listing[prefix.rstrip("/")] = exc
                    listing = None
            names = os.listdir(fd)
            if skip_temp:
                names = [n for n in names if not (n.startswith(TEMP_PREFIX) and is_temp_name(n))]
            for name, row in zip(names, stat_names(fd, names, _FS, listing is not None)):
                mode, size, mtime_ns, uid, gid, nlink, ino, dev, rdev, listed = row
                if mode < 0:  # statx failed: os.stat says why (or the name is back)
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    mode, size, mtime_ns, uid, gid = st.st_mode, st.st_size, st.st_mtime_ns, st.st_uid, st.st_gid
                    nlink, ino, dev, rdev, listed = st.st_nlink, st.st_ino, st.st_dev, st.st_rdev, -1
                fmt = mode & 0o170000
                target = ""
                if fmt == stat.S_IFREG:
                    kind = FILE
                elif fmt == stat.S_IFDIR:
                    kind, size = DIR, 0
                elif fmt == stat.S_IFLNK:
                    kind, size = LINK, 0
                else:
                    kind = SPECIAL.get(fmt)
                    if kind is None:
                        continue
                    size = rdev if kind in DEVICES else 0
                path = prefix + name
                if excluder is not None and excluder.excluded(path, kind == DIR):
                    continue
                if inodes is not None and kind == FILE and nlink > 1:
                    inodes[path] = (dev, ino)
                if listing is not None and listed:  # some attributes, or listing them failed: say which
                    _list_xattrs(listing, path, name)
                if kind == LINK:
                    try:
                        target = os.readlink(name, dir_fd=fd)
                    except FileNotFoundError:
                        continue
                append(_make(Entry, (path, kind, size, mtime_ns, mode & 0o7777, target, uid, gid)))
                if kind == DIR:
                    try:
                        sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except (FileNotFoundError, NotADirectoryError):
                        continue
                    except PermissionError as exc:
                        if unreadable is not None:
                            unreadable.append((path, exc.strerror))
                        continue
                    stack.append((path + "/", sub))
        finally:
            os.close(fd)


def walk(top: str | os.PathLike, excluder: Excluder | None = None, skip_temp: bool = False,
         inodes: dict | None = None, unreadable: list | None = None, xattrs: dict | None = None) -> list[Entry]:
    """Walk ``top``: a directory gives its tree; a regular file gives one entry named by its basename.

    Returns [] when ``top`` does not exist.
    """
    try:
        st = os.lstat(top)
    except FileNotFoundError:
        return []
    if stat.S_ISREG(st.st_mode):
        e = _entry(os.path.basename(os.fspath(top)), st)
        if xattrs is not None:
            _list_xattrs(xattrs, e.path, os.fspath(top))
        return [e]
    fd = os.open(top, _DIR_FLAGS)
    try:
        return walk_fd(fd, excluder, skip_temp, inodes, unreadable, xattrs)
    finally:
        os.close(fd)
