"""Sparse files: only their data travels, and the destination keeps the holes.

A sender asks the file system where a chunk's data is (``SEEK_DATA`` /
``SEEK_HOLE``) when the file has any hole, and sends only those extents,
one after another, as the chunk's payload. The CHUNK frame lists them
(offset and length within the chunk). The receiver gives the file its size
with ``ftruncate`` (never ``posix_fallocate``, which would fill the holes)
and writes each extent at its place: the holes stay holes.

The chunk's digest covers its extent map and then its data: a map spoiled on
the way (a wrong offset, an extent left out) fails the digest as spoiled data
does, and the digest of a chunk that is all hole is that of its empty map.
Both ends compute it the same way (the sender for resume, ``chunk_digest``),
so what a receiver recorded as verified still compares equal on the next run.
"""

from __future__ import annotations

import errno
import os
import struct

from .checksum import READ_PIECE, Hasher, hash_range
from .wire import PIECE, TRAILER

_EXTENT = struct.Struct("<QQ")


def has_holes(fd: int, size: int) -> bool:
    """Whether the open file of ``size`` bytes has a hole anywhere (False when the file system cannot say)."""
    if size == 0:
        return False
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < size
    except OSError:
        return False


def extents(fd: int, offset: int, length: int) -> list[tuple[int, int]]:
    """The data extents of ``length`` bytes at ``offset``: (offset within them, length), in order."""
    out: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            raise
        if start >= end:
            break
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        out.append((start - offset, stop - start))
        pos = stop
    return out


def hole_chunks(fd: int, size: int, chunk_size: int) -> set[int]:
    """The indices of the chunks of the open file that are hole from end to end."""
    data = extents(fd, 0, size)
    holes = set(range(-(-size // chunk_size)))
    for off, n in data:
        holes.difference_update(range(off // chunk_size, (off + n - 1) // chunk_size + 1))
    return holes


def hole_runs(chunks: list, holes_of) -> tuple[list, dict[tuple[str, int], int]]:
    """Chunks (``plan.Item``) that follow one another and are all hole travel as one frame.

    ``holes_of(entry)``: the all-hole chunk indices of a file (``hole_chunks``). Returns the
    chunks still to send and, for the first of each run, how many all-hole chunks come after it
    (``Chunk.holes_after``: the receiver records them with it).
    """
    keep: list = []
    runs: dict[tuple[str, int], int] = {}
    holes: dict[str, set[int]] = {}
    last = None  # the item that carries the run being made, if any
    for it in chunks:
        path = it.entry.path
        if path not in holes:
            holes[path] = holes_of(it.entry)
        if (it.index in holes[path] and last is not None and last.entry.path == path
                and last.index + runs.get((path, last.index), 0) + 1 == it.index):
            runs[(path, last.index)] = runs.get((path, last.index), 0) + 1
            continue
        keep.append(it)
        last = it
    return keep, runs


def check(rows, length: int) -> int:
    """Extents (rows with offset and length) in order, apart and inside ``length`` bytes; returns their bytes.

    Raises ValueError otherwise.
    """
    pos = total = 0
    for row in rows:
        if row.length == 0 or row.offset < pos or row.offset + row.length > length:
            raise ValueError("extents out of order, overlapping or outside the chunk")
        pos = row.offset + row.length
        total += row.length
    return total


def hasher(pairs) -> Hasher:
    """A chunk's hasher, primed with its extent map (pairs of offset and length)."""
    h = Hasher()
    h.update(b"".join(_EXTENT.pack(off, n) for off, n in pairs))
    return h


HOLE_DIGEST = hasher(()).digest()


def payload(fd: int, offset: int, pairs: list[tuple[int, int]]) -> bytearray:
    """The data of the extents of the chunk at ``offset``, one after another."""
    out = bytearray(sum(n for _, n in pairs))
    view, pos = memoryview(out), 0
    for off, n in pairs:
        done = 0
        while done < n:
            got = os.preadv(fd, [view[pos + done:pos + n]], offset + off + done)
            if got == 0:
                raise EOFError("the file shrank while being read")
            done += got
        pos += n
    return out


def chunk_digest(fd: int, offset: int, length: int, pairs: list[tuple[int, int]] | None = None) -> int:
    """The digest a sparse file's chunk travels with (its map, then its data), read with ``pread`` (never
    mapped: a file cut short meanwhile gives ``checksum.FileShrank``, not a SIGBUS). ``pairs``: its
    ``extents`` if known."""
    pairs = extents(fd, offset, length) if pairs is None else pairs
    h = hasher(pairs)
    buf = bytearray(min(max((n for _, n in pairs), default=1), READ_PIECE))
    for off, n in pairs:
        hash_range(h, fd, offset + off, n, buf)
    return h.digest()


def receive(channel, fd: int, offset: int, rows, buf: memoryview) -> tuple[int, int]:
    """Receive a sparse chunk's extents from ``channel`` into ``fd`` (a chunk at ``offset``).

    Returns (digest computed here, digest the peer sent), as
    ``Channel.recv_stream_to_fd`` does for a whole chunk.
    """
    h = hasher((row.offset, row.length) for row in rows)
    step = min(len(buf), PIECE)
    for row in rows:
        pos = 0
        while pos < row.length:
            n = min(step, row.length - pos)
            piece = buf[:n]
            channel.recv_into(piece)
            h.update(piece)
            written = 0
            while written < n:
                written += os.pwrite(fd, piece[written:], offset + row.offset + pos + written)
            pos += n
    trailer = bytearray(TRAILER.size)
    channel.recv_into(memoryview(trailer))
    return h.digest(), TRAILER.unpack(trailer)[0]
