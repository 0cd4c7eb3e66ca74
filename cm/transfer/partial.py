"""What has been verified of a large file that is still being received.

A file of several chunks is received into ``.cm.<id>.part`` next to its
final name, and which chunks arrived intact is recorded in the sidecar
``.cm.<id>.ok``. ``<id>`` is derived from the file's name, the source's size
and mtime and the chunk size, so a later job copying the same source file
finds the same pair and resumes: only chunks not recorded are sent again.
Several receivers (one per destination node, sharing the storage) may write
chunks of one file at once; each records its chunks in its own slot of the
sidecar, and whichever sees every slot filled publishes the file.

A sidecar and its ``.part`` are one unit: the sidecar names the inode of
the ``.part`` it describes, and one that names another inode (the ``.part``
was deleted and made anew, or replaced) vouches for nothing and starts
over. Each slot holds the digest of the bytes it covers, and before a run
resumes, the ``.part``'s bytes are hashed again (``Destination.partials``):
a slot whose bytes do not match (lost in a crash before they reached the
disk, changed by hand) is cleared and its chunk sent again.

A sparse file's chunks travel as their extent map and data (``sparse``) and
their digest covers just that, so each slot says which of the two digests it
holds, and the bytes are hashed again the same way. Receivers sharing a
sidecar write only their own slots; making one anew (a missing or foreign
sidecar) is done under its exclusive ``flock``, so one receiver never wipes
what another has just recorded.

Sidecar layout: ``magic | size u64 | mtime i64 | chunk_size u64 | inode u64``
then one 16-byte slot per chunk: ``digest u64 | form u8 | 7 pad``, form 0:
not received, 1: digest of the chunk's bytes, 2: of a sparse chunk's map and data.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct

_HEAD = struct.Struct("<8sQqQQ")
# 02: the digests are XXH3-64; 03: the inode of the .part (an older sidecar is not trusted: its chunks go again)
_MAGIC = b"CMPART03"
_SLOT = struct.Struct("<QB7x")
_OPEN = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
WHOLE, SPARSE = 1, 2  # what a slot's digest covers: the chunk's bytes, or a sparse chunk's map and data


def lock(fd: int, how: int) -> None:
    """flock, where the file system has it (elsewhere the head's DestinationBusy is the only guard)."""
    try:
        fcntl.flock(fd, how)
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


def chunk_count(size: int, chunk_size: int) -> int:
    """Number of chunks a file of ``size`` bytes is cut into (an empty file has one)."""
    return max(1, -(-size // chunk_size))


def partial_names(name: str, size: int, mtime_ns: int, chunk_size: int) -> tuple[str, str]:
    """(data file, sidecar) names for a partially received file; fixed length whatever ``name``."""
    key = os.fsencode(name) + b"\0" + struct.pack("<QqQ", size, mtime_ns, chunk_size)
    ident = hashlib.blake2b(key, digest_size=10).hexdigest()
    return f".cm.{ident}.part", f".cm.{ident}.ok"


def count_verified(sidecar: bytes) -> int:
    """How many chunks a sidecar's bytes record as verified (for tools and tests that watch a transfer)."""
    slots = sidecar[_HEAD.size:]
    return sum(form != 0 for _, form in _SLOT.iter_unpack(slots[:len(slots) // _SLOT.size * _SLOT.size]))


class ChunkRecord:
    """The sidecar of one partially received file, opened in a directory descriptor."""

    def __init__(self, fd: int, nchunks: int):
        self._fd = fd
        self.nchunks = nchunks

    @classmethod
    def open(cls, dir_fd: int, name: str, size: int, mtime_ns: int, chunk_size: int, inode: int,
             create: bool) -> "ChunkRecord | None":
        """Open the sidecar of the ``.part`` whose inode is ``inode``; None if absent, or if it describes
        another file and not ``create``. With ``create``, a missing or foreign sidecar is made anew (empty),
        under its exclusive lock: the receivers sharing it see it made once, and keep what they mark in it."""
        flags = _OPEN if create else (_OPEN & ~os.O_CREAT)
        try:
            fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        n = chunk_count(size, chunk_size)
        head = _HEAD.pack(_MAGIC, size, mtime_ns, chunk_size, inode)
        want = _HEAD.size + n * _SLOT.size
        try:
            if create:
                lock(fd, fcntl.LOCK_EX)  # another receiver may be making it too: one at a time, and look again
            if os.pread(fd, _HEAD.size, 0) != head or os.fstat(fd).st_size != want:
                if not create:
                    os.close(fd)
                    return None
                os.ftruncate(fd, 0)
                os.pwrite(fd, head, 0)
                os.ftruncate(fd, want)
            if create:
                lock(fd, fcntl.LOCK_UN)
        except OSError:
            os.close(fd)
            raise
        return cls(fd, n)

    def mark(self, index: int, digest: int, form: int = WHOLE) -> None:
        """Record chunk ``index`` as received with ``digest``, of its bytes (``WHOLE``) or its map and data
        (``SPARSE``)."""
        os.pwrite(self._fd, _SLOT.pack(digest, form), _HEAD.size + index * _SLOT.size)

    def clear(self, index: int) -> None:
        """Forget chunk ``index`` (its bytes in the ``.part`` are not what was recorded)."""
        os.pwrite(self._fd, _SLOT.pack(0, 0), _HEAD.size + index * _SLOT.size)

    def _slots(self) -> bytes:
        raw = os.pread(self._fd, self.nchunks * _SLOT.size, _HEAD.size)
        return raw if len(raw) == self.nchunks * _SLOT.size else b""

    def verified(self) -> dict[int, tuple[int, int]]:
        """{chunk index: (digest, form)} of the chunks recorded as received."""
        return {i: (digest, form) for i, (digest, form) in enumerate(_SLOT.iter_unpack(self._slots())) if form}

    def complete(self) -> bool:
        """Whether every chunk has been recorded."""
        slots = self._slots()
        return bool(slots) and b"\0" not in slots[8::_SLOT.size]

    def close(self) -> None:
        """Close the sidecar's descriptor."""
        os.close(self._fd)
