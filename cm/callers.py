"""Who is calling the head: the commands' socket (the peer's uid from SO_PEERCRED, cm.head.clients) and the
HTTP API (a verified token's uid, cm.api) make the same Caller, which request handlers (cm.head.requests) act
for. Both sides import it from here, so neither cm.head nor cm.api imports the other's modules for it.
"""

from __future__ import annotations

import grp
import pwd
import socket
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    pid: int
    user: str
    operator: bool  # root or a member of the operator group


def caller_of(sock: socket.socket, operator_group: str) -> Caller:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return caller_from(uid, gid, pid, operator_group)


def caller_from(uid: int, gid: int, pid: int, operator_group: str) -> Caller:
    """The Caller for a uid the kernel (or a verified API token) vouches for."""
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    operator = uid == 0
    if not operator and operator_group:
        try:
            group = grp.getgrnam(operator_group)
            operator = user in group.gr_mem or gid == group.gr_gid
        except KeyError:
            pass
    return Caller(uid, gid, pid, user, operator)
