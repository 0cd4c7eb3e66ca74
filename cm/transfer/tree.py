"""Walking a tree into a sorted list of entries, and rsync-style excludes.

Both ends walk the same way: directories are opened relative to their
parent's descriptor with ``O_NOFOLLOW`` and symlinks are recorded, never
followed. Paths are ``/``-joined, relative to the top of the tree (``""`` is
the top itself), and sorted, so every rank of a sync job that walks the same
source gets the same list.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from typing import Iterable, NamedTuple

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
    """True for exactly the names of the mover's own temporary/state files, which walks leave out
    (a user's ``.cm.notes.tmp`` is the user's file and is copied like any other)."""
    return name.startswith(TEMP_PREFIX) and _TEMP_NAME.fullmatch(name) is not None


MAX_PATTERNS = 64  # exclude patterns one sync may give
MAX_PATTERN_LENGTH = 1024  # characters in one pattern


def check_patterns(patterns: Iterable[str]) -> list[str]:
    """The patterns, if there are not too many nor any too long; raises ``ValueError`` saying which."""
    patterns = list(patterns)
    if len(patterns) > MAX_PATTERNS:
        raise ValueError(f"at most {MAX_PATTERNS} --exclude patterns, not {len(patterns)}")
    for pat in patterns:
        if not isinstance(pat, str) or not pat or not pat.rstrip("/"):
            raise ValueError(f"bad exclude pattern {pat!r}")
        if len(pat) > MAX_PATTERN_LENGTH:
            raise ValueError(f"exclude pattern of {len(pat)} characters (at most {MAX_PATTERN_LENGTH}): {pat[:40]!r}...")
    return patterns


class _Glob:
    """One glob matched in linear time: a bit-parallel NFA over its tokens, no backtracking.

    Tokens: ``*`` (any run of characters but ``/``), ``**`` (any run),
    ``?`` (one character but ``/``), ``[...]`` (one of a set, ``!`` or ``^``
    negates; never ``/``) and literal characters. Bit ``i`` of the state is
    set when the first ``i`` tokens can have matched what was read; each
    character costs a few integer operations, whatever the pattern, so no
    pattern and name can take more than length × tokens steps. ``restart``:
    the pattern may also begin after any ``/`` (rsync's unanchored
    patterns with a ``/``).
    """

    def __init__(self, glob: str, restart: bool = False):
        self.restart = restart
        self._tests: list = []  # per token: (is_star, test(char) -> bool)
        i = 0
        while i < len(glob):
            c = glob[i]
            if c == "*":
                j = i
                while j < len(glob) and glob[j] == "*":
                    j += 1
                crosses = j - i >= 2
                if self._tests and self._tests[-1][0]:  # a star after a star: one star, the wider
                    crosses = crosses or self._tests[-1][2]
                    self._tests.pop()
                self._tests.append((True, (lambda ch: True) if crosses else (lambda ch: ch != "/"), crosses))
                i = j
                continue
            if c == "?":
                self._tests.append((False, lambda ch: ch != "/", False))
            elif c == "[" and (k := _class_end(glob, i)) > 0:
                self._tests.append((False, _char_class(glob[i + 1:k]), False))
                i = k
            else:
                self._tests.append((False, c.__eq__, False))
            i += 1
        self._final = 1 << len(self._tests)
        self._eps = sum(1 << n for n, (star, _, _) in enumerate(self._tests) if star)
        self._start = self._close(1)
        self._masks: dict[str, tuple[int, int]] = {}

    def _close(self, state: int) -> int:
        return state | (state & self._eps) << 1  # stars never follow stars: one step closes

    def _masks_of(self, ch: str) -> tuple[int, int]:
        one = loop = 0
        for n, (star, test, _) in enumerate(self._tests):
            if test(ch):
                if star:
                    loop |= 1 << n
                else:
                    one |= 1 << n
        if len(self._masks) < 4096:  # names hold few distinct characters; a flood of others is only slower
            self._masks[ch] = (one, loop)
        return one, loop

    def match(self, text: str) -> bool:
        """Whether the whole of ``text`` matches (or, with ``restart``, the part after one of its ``/``)."""
        state = start = self._start
        masks, eps, restart = self._masks, self._eps, self.restart
        for ch in text:
            one, loop = masks.get(ch) or self._masks_of(ch)
            state = (state & one) << 1 | (state & loop)
            state |= (state & eps) << 1
            if restart:
                if ch == "/":
                    state |= start
            elif not state:
                return False
        return bool(state & self._final)


def _class_end(glob: str, i: int) -> int:
    """Index of the ``]`` closing the class that opens at ``i`` (a ``]`` right after ``[`` or ``[!`` is in it), or -1."""
    j = i + 1
    if glob[j:j + 1] in ("!", "^"):
        j += 1
    if glob[j:j + 1] == "]":
        j += 1
    return glob.find("]", j)


def _char_class(body: str):
    negate = body[:1] in ("!", "^")
    if negate:
        body = body[1:]
    ranges, i = [], 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            ranges.append((body[i], body[i + 2]))
            i += 3
        else:
            ranges.append((body[i], body[i]))
            i += 1

    def test(ch: str) -> bool:
        return ch != "/" and any(lo <= ch <= hi for lo, hi in ranges) != negate

    return test


def _matcher(body: str, restart: bool, name_only: bool):
    """The fastest exact test for one pattern body: string compares for plain names and ``*.ext``, else a ``_Glob``."""
    wild = set(body) & set("*?[")
    if not wild:
        return (lambda s: s == body or s.endswith("/" + body)) if restart else body.__eq__
    if name_only and wild == {"*"} and body.count("*") == 1:
        head, _, tail = body.partition("*")  # no "/" in a name: "*" and "**" are alike
        n = len(head) + len(tail)
        return lambda s: len(s) >= n and s.startswith(head) and s.endswith(tail)
    return _Glob(body, restart).match


class Excluder:
    """rsync-style exclude patterns, matched in time linear in the name (``_Glob``).

    A pattern without ``/`` matches a name at any depth; a pattern with a
    ``/`` matches the end of the path (a leading ``/`` anchors it to the
    top of the tree); a trailing ``/`` matches directories only; ``*`` and
    ``?`` stop at ``/``, ``**`` does not. Excluded directories are not
    entered, and excluded destination files are not deleted. Only senders
    match them (the user's own process): the receiver lists all it has and
    the sender leaves out what is excluded (``prune``).
    """

    def __init__(self, patterns: Iterable[str] = ()):
        self.patterns = check_patterns(patterns)
        self._rules: list[tuple] = []
        for pat in self.patterns:
            dir_only = pat.endswith("/")
            body = pat.rstrip("/")
            anchored = body.startswith("/")
            whole_path = "/" in body
            body = body.lstrip("/")
            self._rules.append((_matcher(body, whole_path and not anchored, not (whole_path or anchored)), dir_only,
                                whole_path or anchored))

    def __bool__(self) -> bool:
        return bool(self._rules)

    def excluded(self, path: str, is_dir: bool) -> bool:
        """Whether ``path`` (relative, ``/``-joined) is excluded."""
        name = path.rsplit("/", 1)[-1]
        for match, dir_only, whole in self._rules:
            if dir_only and not is_dir:
                continue
            if match(path if whole else name):
                return True
        return False

    def prune(self, entries: list[Entry]) -> list[Entry]:
        """``entries`` (sorted, as walks give them) without the excluded ones and what is in excluded directories."""
        if not self._rules:
            return entries
        out, gone = [], set()
        for e in entries:
            if e.path and (e.path.rpartition("/")[0] in gone or self.excluded(e.path, e.kind == DIR)):
                if e.kind == DIR:
                    gone.add(e.path)
                continue
            out.append(e)
        return out


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
    Listing them takes a system call per entry; made with a name relative
    to the working directory it costs a third of one made with the whole
    path, so the walk then moves the process's working directory into
    each directory it lists (and back at the end): only for a
    single-threaded caller (the sender, before its streams start).
    """
    excluder = excluder if excluder else None
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
    append = entries.append
    while stack:
        prefix, fd = stack.pop()
        listing = xattrs
        try:
            if listing is not None:
                try:
                    os.fchdir(fd)
                except OSError as exc:  # no search permission: neither can its entries be looked at
                    listing[prefix.rstrip("/")] = exc
                    listing = None
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
                        kind = SPECIAL.get(fmt)
                        if kind is None:
                            continue
                        if kind in DEVICES:
                            size = st.st_rdev
                    if excluder is not None and excluder.excluded(path, kind == DIR):
                        continue
                    if inodes is not None and kind == FILE and st.st_nlink > 1:
                        inodes[path] = (st.st_dev, st.st_ino)
                    if listing is not None:
                        _list_xattrs(listing, path, name)
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
