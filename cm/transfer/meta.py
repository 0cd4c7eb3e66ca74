"""What a sync keeps besides data, modes and times: hard links, xattrs, POSIX ACLs, fifos, sockets, devices.

Sender side: ``link_groups`` turns the walk's (st_dev, st_ino) of files with
other names into groups (the first name in path order is the one whose data
travels, the others are linked to it at the destination); ``read_xattrs``
reads the attributes in the transfer's ``namespaces``: ``user.`` for every
sync, ``trusted.`` and ``security.`` for root's and operators' (which keep
owners), and the POSIX ACLs, which are the ``system.posix_acl_access`` and
``system.posix_acl_default`` attributes: copying those raw values copies
the ACLs (with numeric ids, as ``rsync --numeric-ids -A``).

Every rank of a job walks the same tree, so ``pin`` gives each link group,
and each file with attributes, to one rank: that rank sends all of its data,
then links the other names and sets the attributes, after its file is in place.

Receiver side (``Destination`` calls these, as the job's user): ``make_specials``,
``hard_links``, ``set_xattrs``. What the destination cannot hold (no xattr
support, an ACL it refuses, a device the user may not make) comes back as a
skip with its reason, never silently; the sender counts and reports it.
"""

from __future__ import annotations

import errno
import os
import stat
import zlib

from cm.creds import current

from .destination import in_dir
from .frames import Applied, HardLinkRow, PathError, SpecialRow, XAttr, XAttrRow
from .paths import PathEscape, wire_parts
from .tree import BLOCK, CHAR, DIR, FILE, FIFO, SOCKET, Entry

USER = b"user."
ACLS = (b"system.posix_acl_access", b"system.posix_acl_default")
PRIVILEGED = (b"trusted.", b"security.")  # root's and operators' syncs only
DEFAULT_ACL = ACLS[1]
_FORMAT = {FIFO: stat.S_IFIFO, SOCKET: stat.S_IFSOCK, CHAR: stat.S_IFCHR, BLOCK: stat.S_IFBLK}
# what a destination may answer for an attribute it cannot hold: a counted skip, not a failure
_CANNOT_HOLD = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL, errno.E2BIG, errno.ENOSPC, errno.ERANGE, errno.EPERM,
                errno.EDQUOT}


def namespaces(xattrs: bool, acls: bool, owners: bool) -> tuple[bytes, ...]:
    """The attribute name prefixes a transfer keeps."""
    out: tuple[bytes, ...] = ()
    if xattrs:
        out += (USER,) + (PRIVILEGED if owners else ())
    if acls:
        out += ACLS
    return out


def kept(name: bytes, spaces: tuple[bytes, ...]) -> bool:
    return name.startswith(spaces)


def link_groups(inodes: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """{first name: [the other names]} of each inode that has more than one name in the tree."""
    by_inode: dict[tuple[int, int], list[str]] = {}
    for path, key in inodes.items():
        by_inode.setdefault(key, []).append(path)
    groups = {}
    for names in by_inode.values():
        if len(names) > 1:
            names.sort()
            groups[names[0]] = names[1:]
    return groups


def pin(path: str, nranks: int) -> int:
    """The rank that owns ``path``'s link group or attributes (the same on every rank)."""
    return zlib.crc32(os.fsencode(path)) % nranks if nranks > 1 else 0


def read_xattrs(top: os.PathLike, entries: list[Entry], listed: dict, spaces: tuple[bytes, ...], owners: bool,
                skip) -> dict[str, list[tuple[bytes, bytes]]]:
    """{path: [(name, value), ...]} of the entries that have attributes in ``spaces``.

    ``listed``: the names the walk found (``tree.walk``'s ``xattrs``). Regular files and directories
    only, unless the transfer keeps owners (the ``user.`` namespace exists on nothing else).
    ``skip(path, reason)`` hears of attributes that cannot be read.
    """
    out: dict[str, list[tuple[bytes, bytes]]] = {}
    if not listed:
        return out
    base = os.fsencode(top)
    for e in entries:
        names = listed.get(e.path)
        if names is None or not owners and e.kind not in (FILE, DIR):
            continue
        if isinstance(names, OSError):
            skip(e.path, f"its extended attributes cannot be read: {names.strerror}")
            continue
        path = os.path.join(base, os.fsencode(e.path)) if e.path else base
        attrs = []
        for name in sorted(names):
            raw = os.fsencode(name)
            if not kept(raw, spaces):
                continue
            try:
                attrs.append((raw, os.getxattr(path, name, follow_symlinks=False)))
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    skip(e.path, f"extended attribute {name} cannot be read: {exc.strerror}")
        if attrs:
            out[e.path] = attrs
    return out


def has_default_acls(attrs: dict[str, list[tuple[bytes, bytes]]]) -> bool:
    """Whether some directory has a default ACL: files made in it inherit one, which may need undoing."""
    return any(name == DEFAULT_ACL for pairs in attrs.values() for name, _ in pairs)


class Kept:
    """What one rank keeps besides data: the tree's link groups and attributes, and which rank does what.

    ``pinned``: the files that go whole to one rank (``plan.share``): each
    link group's first name, each file with attributes, and every file when
    some directory has a default ACL (a file made there inherits an ACL that
    its rank undoes afterwards, so that rank must be the one that made it).
    """

    def __init__(self, spaces: tuple[bytes, ...], attrs: dict[str, list[tuple[bytes, bytes]]],
                 groups: dict[str, list[str]], nranks: int, entries: list[Entry]):
        self.spaces = spaces
        self.attrs = attrs
        self.groups = groups
        self.nranks = nranks
        self.followers = {p: leader for leader, names in groups.items() for p in names}
        self.inherits = has_default_acls(attrs)
        self.pinned: dict[str, int] = {}
        if nranks > 1:
            wanted = (e.path for e in entries if e.kind == FILE and e.path not in self.followers
                      and (self.inherits or e.path in attrs or e.path in groups))
            self.pinned = {path: pin(path, nranks) for path in wanted}

    def links_of(self, rank: int) -> list[tuple[str, str]]:
        """(first name, other name) of the link groups ``rank`` links."""
        return [(leader, p) for leader, names in self.groups.items() if pin(leader, self.nranks) == rank
                for p in names]

    def xattr_rows(self, entries: list[Entry], rank: int, sent: list, made_dirs: list[Entry]) -> list[XAttrRow]:
        """The attribute rows ``rank`` sends: its files' (pinned to it), and the lead's the rest's.

        ``sent`` (this rank's work items) and ``made_dirs`` get a row even without attributes when
        they may have inherited an ACL the source does not have."""
        fresh = {it.entry.path for it in sent} | {e.path for e in made_dirs} if self.inherits else set()
        if not self.attrs and not fresh:
            return []  # the usual re-sync: no row, and no pass over the tree
        rows = []
        for e in entries:
            if e.path not in self.attrs and e.path not in fresh or e.path in self.followers:
                continue  # nothing to say, or the same inode as its first name
            owner = pin(e.path, self.nranks) if e.kind == FILE else 0
            if owner != rank:
                continue
            pairs = self.attrs.get(e.path)
            if pairs is not None or e.path in fresh:
                rows.append(XAttrRow(os.fsencode(e.path), e.mode, [XAttr(n, v) for n, v in pairs or ()]))
        return rows


# ---- the receiving side: ``dest`` is a ``destination.Destination`` ----

def _where(dest, path: bytes) -> str:
    """A path naming the entry itself (its directories reached without following symlinks): the xattr
    calls have no ``*at`` form, so they go through the parent's descriptor in /proc."""
    parts = wire_parts(os.fsdecode(path))
    if not parts:
        return f"/proc/self/fd/{dest.dirs.open(())}"
    return f"/proc/self/fd/{dest.dirs.open(parts[:-1])}/{parts[-1]}"


def _skip_or_fail(skipped: list, errors: list, path: bytes, what: str, exc: OSError) -> None:
    if exc.errno in _CANNOT_HOLD:
        skipped.append(PathError(path, f"{what}: the destination cannot hold it ({exc.strerror})"))
    else:
        errors.append(PathError(path, f"{what}: {type(exc).__name__}: {exc}"))


def make_specials(dest, rows: list[SpecialRow], devices: bool) -> Applied:
    """Create each fifo, socket (and device, when ``devices``) under a temporary name, then in place."""
    ans = Applied()
    for i, row in enumerate(rows):
        if row.kind in (CHAR, BLOCK) and not devices:
            ans.skipped.append(PathError(row.path, "device files are made by root's and operators' syncs only"))
            continue
        try:
            parts = wire_parts(os.fsdecode(row.path))
            dfd = dest._parent(parts, create=True)
            tmp = dest._tmp_name()
            rdev = row.rdev if row.kind in (CHAR, BLOCK) else 0
            in_dir(dfd, os.mknod, tmp, _FORMAT[row.kind] | 0o600, rdev, dir_fd=dfd)
            try:
                os.chmod(tmp, row.mode, dir_fd=dfd)
                os.utime(tmp, ns=(row.mtime, row.mtime), dir_fd=dfd, follow_symlinks=False)
                dest._publish(dfd, tmp, parts[-1])
            except OSError:
                _unlink(dfd, tmp)
                raise
            ans.changed.append(i)
        except PathEscape as exc:
            ans.errors.append(PathError(row.path, str(exc)))
        except OSError as exc:
            if exc.errno == errno.EPERM and row.kind in (CHAR, BLOCK):
                ans.skipped.append(PathError(row.path, f"the device cannot be made here ({exc.strerror})"))
            else:
                ans.errors.append(PathError(row.path, f"{type(exc).__name__}: {exc}"))
    return ans


def hard_links(dest, rows: list[HardLinkRow]) -> Applied:
    """Make each ``path`` another name of its ``leader`` (already in place), unless it is one already."""
    ans = Applied()
    for i, row in enumerate(rows):
        try:
            lparts = wire_parts(os.fsdecode(row.leader))
            parts = wire_parts(os.fsdecode(row.path))
            if not lparts or not parts:
                raise PathEscape("the top of the tree is not a file")
            lfd = dest.dirs.open(lparts[:-1])
            leader = os.stat(lparts[-1], dir_fd=lfd, follow_symlinks=False)
            if not stat.S_ISREG(leader.st_mode):
                raise IsADirectoryError(f"{os.fsdecode(row.leader)!r} is not a regular file")
            dfd = dest._parent(parts, create=True)
            try:
                now = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (leader.st_dev, leader.st_ino):
                    continue  # linked already
            except FileNotFoundError:
                pass
            tmp = dest._tmp_name()
            in_dir(dfd, os.link, lparts[-1], tmp, src_dir_fd=lfd, dst_dir_fd=dfd, follow_symlinks=False)
            try:
                dest._publish(dfd, tmp, parts[-1])
            except OSError:
                _unlink(dfd, tmp)
                raise
            ans.changed.append(i)
        except PathEscape as exc:
            ans.errors.append(PathError(row.path, str(exc)))
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EMLINK, errno.EPERM):
                ans.skipped.append(PathError(row.path, f"cannot be a hard link here ({exc.strerror}); "
                                                       f"its file was copied under {os.fsdecode(row.leader)!r}"))
            else:
                ans.errors.append(PathError(row.path, f"{type(exc).__name__}: {exc}"))
    return ans


def set_xattrs(dest, rows: list[XAttrRow], spaces: tuple[bytes, ...]) -> Applied:
    """Give each entry exactly the attributes of its row within ``spaces`` (as the job's user)."""
    ans = Applied()
    for i, row in enumerate(rows):
        try:
            path = _where(dest, row.path)
            st = os.stat(path, follow_symlinks=False)
            have = {os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False)}
        except PathEscape as exc:
            ans.errors.append(PathError(row.path, str(exc)))
            continue
        except FileNotFoundError as exc:
            if row.attrs:
                ans.errors.append(PathError(row.path, f"{type(exc).__name__}: {exc}"))
            continue
        except OSError as exc:
            if row.attrs:
                _skip_or_fail(ans.skipped, ans.errors, row.path, "extended attributes", exc)
            continue
        changed = False
        want = {a.name: a.value for a in row.attrs if kept(a.name, spaces)}
        if len(want) != len(row.attrs):
            ans.errors.append(PathError(row.path, "an attribute outside the transfer's namespaces"))
        for n in sorted(have):
            if kept(n, spaces) and n not in want:
                changed |= _change(ans, row, path, st, n, None)
        for n, value in want.items():
            try:
                same = n in have and os.getxattr(path, n, follow_symlinks=False) == value
            except OSError:
                same = False
            if not same:
                changed |= _change(ans, row, path, st, n, value)
        if ACLS[0] in have and ACLS[0] not in want and stat.S_ISREG(st.st_mode):
            try:  # an inherited ACL undone: the mode the source has (its group bits were the ACL's mask)
                os.chmod(path, row.mode, follow_symlinks=True)
            except OSError as exc:
                ans.errors.append(PathError(row.path, f"{type(exc).__name__}: {exc}"))
        if changed:
            ans.changed.append(i)
    return ans


def _change(ans: Applied, row: XAttrRow, path: str, st: os.stat_result, name: bytes, value: bytes | None) -> bool:
    """Set (or with ``value`` None remove) one attribute; an owner's read-only file is made writable
    for the moment it takes (``user.`` attributes need write permission, ACLs only ownership)."""
    what = ("ACL " if name in ACLS else "extended attribute ") + os.fsdecode(name)
    try:
        if value is None:
            os.removexattr(path, name, follow_symlinks=False)
        else:
            os.setxattr(path, name, value, follow_symlinks=False)
        return True
    except OSError as exc:
        if exc.errno == errno.EACCES and _owns(st) and not stat.S_ISLNK(st.st_mode) and \
                _with_write(path, st, name, value):
            return True
        _skip_or_fail(ans.skipped, ans.errors, row.path, what, exc)
        return False


def _owns(st: os.stat_result) -> bool:
    """Whether this thread (as the job's user, see ``cm.creds``) owns what ``st`` describes."""
    who = current()
    return (who.uid if who is not None else os.geteuid()) == st.st_uid


def _with_write(path: str, st: os.stat_result, name: bytes, value: bytes | None) -> bool:
    mode = stat.S_IMODE(st.st_mode)
    try:
        os.chmod(path, mode | stat.S_IWUSR)
    except OSError:
        return False
    try:
        if value is None:
            os.removexattr(path, name, follow_symlinks=False)
        else:
            os.setxattr(path, name, value, follow_symlinks=False)
        return True
    except OSError:
        return False
    finally:
        os.chmod(path, mode)


def _unlink(dfd: int, name: str) -> None:
    try:
        in_dir(dfd, os.unlink, name, dir_fd=dfd)
    except FileNotFoundError:
        pass
