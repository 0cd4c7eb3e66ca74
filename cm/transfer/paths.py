"""Confining sync paths to a partition's data root.

Two layers:

* ``check_lexical`` / ``confine`` resolve a user-given path (relative to the
  data root) once, when a job is submitted or a transfer registered: ``..``
  that climbs out, and existing symlinks that lead out of the root, are
  refused with ``PathEscape``.
* ``DirHandles`` is what the mover uses afterwards: it reaches directories
  one component at a time with ``O_NOFOLLOW`` relative to an open directory
  descriptor, so no symlink inside the tree is ever followed, whatever
  changes on disk between the check and the use.
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PathEscape(ValueError):
    """A path leads outside the root it must stay in."""


def check_lexical(rel: str) -> str:
    """Normalise ``rel`` (relative to a data root) without touching the disk.

    A leading ``/`` means the root; ``""`` and ``"/"`` are the root itself
    and give ``""``. ``.`` and empty components are dropped and ``..`` is
    resolved lexically. Raises ``PathEscape`` when ``..`` climbs above the
    root or the path contains a NUL byte. Returns ``"a/b/c"`` style text.
    """
    if not isinstance(rel, str):
        raise PathEscape(f"path must be text, not {type(rel).__name__}")
    if "\0" in rel:
        raise PathEscape("path contains a NUL byte")
    parts: list[str] = []
    for part in rel.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise PathEscape(f"{rel!r} climbs out of the data root")
            parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def confine(root: Path, rel: str) -> Path:
    """Return the absolute path ``rel`` names under ``root``, or raise ``PathEscape``.

    Each existing component is checked on disk: a symlink is resolved and
    must land inside ``root``. Components that do not exist yet (e.g. a
    destination about to be created) are appended as they are.
    """
    real_root = Path(os.path.realpath(root))
    if not real_root.is_dir():
        raise PathEscape(f"data root {str(root)!r} is not a directory")
    current = real_root
    parts = [p for p in check_lexical(rel).split("/") if p]
    for i, part in enumerate(parts):
        candidate = current / part
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            return current.joinpath(*parts[i:])
        except NotADirectoryError as exc:
            raise PathEscape(f"{rel!r}: {current} is not a directory") from exc
        if stat.S_ISLNK(st.st_mode):
            target = Path(os.path.realpath(candidate))
            if not _inside(target, real_root):
                raise PathEscape(f"{rel!r}: {part!r} is a symlink leading outside the data root")
            candidate = target
        current = candidate
    return current


def wire_parts(path: str) -> tuple[str, ...]:
    """Split a tree-relative path received from a peer, refusing anything unsafe.

    Unlike ``check_lexical`` this does not resolve ``..``: a peer has no
    business sending one. ``""`` is the tree's top. Raises ``PathEscape``.
    """
    if path == "":
        return ()
    if "\0" in path or path.startswith("/"):
        raise PathEscape(f"{path!r} is not a relative path")
    parts = tuple(path.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise PathEscape(f"{path!r} has a {part!r} component")
    return parts


class DirHandles:
    """Open directories under a root without following symlinks.

    ``root`` is a real directory (already resolved); ``prefix`` is the path
    below it, as components, where the tree of interest starts (for a
    destination: the confined sync target, which may not exist yet).
    ``open(parts)`` reaches ``root/prefix/parts`` one component at a time
    with ``O_NOFOLLOW``. Descriptors are cached (least recently used closed
    first) because a transfer touches the same directories over and over.
    Not thread-safe: use one per thread.
    """

    def __init__(self, root: Path, prefix: tuple[str, ...] = (), capacity: int = 64):
        self.root = root
        self.prefix = prefix
        self._capacity = max(capacity, 2)
        self._fds: OrderedDict[tuple[str, ...], int] = OrderedDict()

    def open(self, parts: tuple[str, ...], create: bool = False, mode: int = 0o755) -> int:
        """Return a descriptor for the directory ``root/prefix/parts`` (owned by the cache).

        With ``create``, missing directories are made with ``mode``. Raises
        ``PathEscape`` if a component is a symlink, ``NotADirectoryError``
        if it is something else that is not a directory, and
        ``FileNotFoundError`` if it is missing and ``create`` is false.
        """
        return self._open(self.prefix + parts, create, mode)

    def _open(self, key: tuple[str, ...], create: bool, mode: int) -> int:
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        if not key:
            fd = os.open(self.root, _DIR_FLAGS)
        else:
            parent = self._open(key[:-1], create, mode)
            fd = self._open_child(parent, key, create, mode)
        self._fds[key] = fd
        while len(self._fds) > self._capacity:
            old_key = next(iter(self._fds))
            os.close(self._fds.pop(old_key))
        return fd

    def _open_child(self, parent: int, key: tuple[str, ...], create: bool, mode: int) -> int:
        name = key[-1]
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as exc:
            self._explain(parent, key, exc)
            raise
        try:
            self._mkdir(parent, key, mode)
        except FileExistsError:
            pass
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            self._explain(parent, key, exc)
            raise

    def _mkdir(self, parent: int, key: tuple[str, ...], mode: int) -> None:
        """Make ``key``'s last component in ``parent`` (the directory of ``key[:-1]``)."""
        os.mkdir(key[-1], mode, dir_fd=parent)

    @staticmethod
    def _explain(parent: int, key: tuple[str, ...], exc: OSError) -> None:
        try:
            st = os.stat(key[-1], dir_fd=parent, follow_symlinks=False)
        except OSError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise PathEscape(f"{'/'.join(key)!r} is a symlink, not a directory") from exc
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(f"{'/'.join(key)!r} is not a directory") from exc

    def forget(self, parts: tuple[str, ...]) -> None:
        """Drop cached descriptors for ``parts`` and everything below it (after a delete)."""
        full = self.prefix + parts
        n = len(full)
        for key in [k for k in self._fds if k[:n] == full]:
            os.close(self._fds.pop(key))

    def forget_child(self, parent_fd: int, name: str | bytes) -> None:
        """Drop cached descriptors for ``name`` inside the cached directory ``parent_fd`` (it was removed)."""
        for key, fd in list(self._fds.items()):
            if fd == parent_fd:
                child = key + (os.fsdecode(name),)
                for k in [k for k in self._fds if k[:len(child)] == child]:
                    os.close(self._fds.pop(k))
                return

    def close(self) -> None:
        """Close every cached descriptor."""
        while self._fds:
            _, fd = self._fds.popitem()
            os.close(fd)
