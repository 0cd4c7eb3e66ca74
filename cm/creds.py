"""Acting as a user on the file system, from one thread of a root process.

Linux keeps the credentials that file-system checks use per thread: the
file-system uid and gid (``setfsuid``/``setfsgid``) and the supplementary
groups (the raw ``setgroups`` system call; glibc's wrapper changes every
thread of the process, as POSIX asks). A thread that takes on a user's
three is checked by the kernel exactly as that user's own ``cp`` or ``rm``
would be, and the files it creates belong to the user; the process's other
threads stay root. User-space NFS servers serve many users from one
process this way.

``acting_as`` takes on an identity for a block and restores root's after
it, or raises ``CredentialsError`` if the kernel did not take it (never
runs the block as root by mistake).
"""

from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.setfsuid.restype = ctypes.c_int
_libc.setfsgid.restype = ctypes.c_int
_SYS_SETGROUPS = 116  # x86_64
_SYS_GETGROUPS = 115
if os.uname().machine in ("aarch64", "arm64"):
    _SYS_SETGROUPS, _SYS_GETGROUPS = 159, 158

_state = threading.local()


class CredentialsError(OSError):
    """The thread could not take on (or give back) an identity."""


@dataclass(frozen=True)
class Identity:
    """Who a job acts as on the file system: uid, primary gid, supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @classmethod
    def of_user(cls, uid: int, gid: int) -> "Identity":
        """The identity with the user's supplementary groups from the group database."""
        return cls(uid, gid, tuple(groups_of(uid, gid)))

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def groups_of(uid: int, gid: int) -> list[int]:
    """The user's supplementary groups (without gid); none for a uid the password database lacks."""
    import pwd

    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return []
    return [g for g in os.getgrouplist(name, gid) if g != gid]


def _set_groups(groups: tuple[int, ...]) -> None:
    arr = (ctypes.c_uint * max(len(groups), 1))(*groups)
    if _libc.syscall(_SYS_SETGROUPS, ctypes.c_long(len(groups)), arr) != 0:
        err = ctypes.get_errno()
        raise CredentialsError(err, f"setgroups: {os.strerror(err)}")


def _thread_groups() -> tuple[int, ...]:
    arr = (ctypes.c_uint * 65536)()
    n = _libc.syscall(_SYS_GETGROUPS, ctypes.c_long(65536), arr)
    if n < 0:
        err = ctypes.get_errno()
        raise CredentialsError(err, f"getgroups: {os.strerror(err)}")
    return tuple(arr[:n])


def _set_fs(uid: int, gid: int) -> None:
    # setfsuid answers the previous value whether or not it worked: ask again (-1 changes nothing)
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    if _libc.setfsgid(-1) != gid or _libc.setfsuid(-1) != uid:
        raise CredentialsError(1, f"the kernel refused file-system identity {uid}:{gid}")


@contextmanager
def acting_as(who: Identity) -> Iterator[None]:
    """Run the block with this thread's file-system checks done as ``who``.

    Needs root (the process's effective uid 0); a non-root process can only
    act as itself, and then the block just runs. Nests: the inner identity
    wins, the outer one is restored.
    """
    euid = os.geteuid()
    if euid != 0:
        if who.uid != euid:
            raise CredentialsError(1, f"a process running as uid {euid} cannot act as uid {who.uid}")
        yield
        return
    before = getattr(_state, "current", None)
    saved = (_libc.setfsuid(-1), _libc.setfsgid(-1), _thread_groups())
    try:
        _set_groups(who.groups)
        _set_fs(who.uid, who.gid)
        _state.current = who
    except CredentialsError:
        _restore(saved)
        raise
    try:
        yield
    finally:
        _restore(saved)
        _state.current = before


def _restore(saved: tuple[int, int, tuple[int, ...]]) -> None:
    uid, gid, groups = saved
    _set_fs(uid, gid)
    _set_groups(groups)


def current() -> Identity | None:
    """The identity this thread acts as inside ``acting_as``, or None."""
    return getattr(_state, "current", None)
