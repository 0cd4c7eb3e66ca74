"""xxh64 checksums: numba-compiled for the data path, pure Python as the reference.

The mover verifies every chunk and every small file with xxh64 (seed 0).
``digest`` hashes one buffer (a mapped file region, a bytearray, bytes);
``digest_many`` hashes many files packed in one buffer with a single call so
that a batch of small files costs one dispatch, not one per file. Both run
compiled code that releases the GIL, so sender and receiver threads overlap
hashing with socket I/O.

numba caches the compiled code on disk (``cache=True``) so a new process does
not compile again. When numba's default cache location (next to this file)
is not writable and ``NUMBA_CACHE_DIR`` is unset or unwritable, a per-user
directory under the system temp dir is used instead, seeded with a copy of
an unwritable ``NUMBA_CACHE_DIR`` (a cache compiled ahead for every user).
"""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def _choose_cache_dir() -> None:
    """Point numba at a writable cache directory before it is imported."""
    configured = os.environ.get("NUMBA_CACHE_DIR")
    if configured:
        if _writable_dir(Path(configured)):
            return
    elif _writable_dir(Path(__file__).resolve().parent / "__pycache__"):
        return
    fallback = _private_dir(Path(tempfile.gettempdir()) / f"cm-numba-cache-{os.getuid()}")
    if configured and Path(configured).is_dir() and not any(fallback.iterdir()):
        # a shared cache compiled ahead (the Docker image's) seeds this user's own copy
        import shutil

        try:
            shutil.copytree(configured, fallback, dirs_exist_ok=True)
        except (OSError, shutil.Error):
            pass  # an incomplete copy only means compiling what is missing
    os.environ["NUMBA_CACHE_DIR"] = str(fallback)


def _private_dir(path: Path) -> Path:
    """path if it is a directory of this user's that nobody else may write (made so if missing);
    otherwise a fresh private one. Another user could have made the shared name first and filled it
    with compiled code for us to load."""
    import stat

    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return Path(tempfile.mkdtemp(prefix="cm-numba-cache-"))
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022:
        return path
    return Path(tempfile.mkdtemp(prefix="cm-numba-cache-"))


_choose_cache_dir()
# numpy's BLAS threads would spin on our two or so cores for nothing: we never do linear algebra
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numba  # noqa: E402  (must follow the cache-dir choice)
import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

if os.environ.get("NUMBA_CACHE_DIR") and numba.config.CACHE_DIR != os.environ["NUMBA_CACHE_DIR"]:
    # numba was imported before us with another cache dir; follow the env var.
    numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]

_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)
_P5 = np.uint64(0x27D4EB2F165667C5)


@njit(cache=True, nogil=True, inline="always")
def _rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@njit(cache=True, nogil=True, inline="always")
def _round(acc, lane):
    acc = acc + lane * _P2
    acc = _rotl(acc, 31)
    return acc * _P1


@njit(cache=True, nogil=True, inline="always")
def _merge(acc, val):
    acc = acc ^ _round(np.uint64(0), val)
    return acc * _P1 + _P4


@njit(cache=True, nogil=True, inline="always")
def _read_le(data, i, width):
    """The little-endian unsigned integer in data[i:i+width] (width 4 or 8)."""
    v = np.uint64(0)
    for k in range(width):
        v |= np.uint64(data[i + k]) << np.uint64(8 * k)
    return v


@njit(cache=True, nogil=True, inline="always")
def _fold_tail(h, data, p, end):
    """The last steps of xxh64: fold data[p:end] (fewer than 32 bytes) into h, then avalanche."""
    while p + 8 <= end:
        h = h ^ _round(np.uint64(0), _read_le(data, p, 8))
        h = _rotl(h, 27) * _P1 + _P4
        p += 8
    if p + 4 <= end:
        h = h ^ (_read_le(data, p, 4) * _P1)
        h = _rotl(h, 23) * _P2 + _P3
        p += 4
    while p < end:
        h = h ^ (np.uint64(data[p]) * _P5)
        h = _rotl(h, 11) * _P1
        p += 1
    h = h ^ (h >> np.uint64(33))
    h = h * _P2
    h = h ^ (h >> np.uint64(29))
    h = h * _P3
    h = h ^ (h >> np.uint64(32))
    return h


@njit(cache=True, nogil=True, inline="always")
def _fold_blocks(data, start, nblocks, v1, v2, v3, v4):
    """Fold ``nblocks`` 32-byte blocks of data from ``start`` into the four lanes."""
    # One 64-bit load per lane; x86 and arm64 allow unaligned loads.
    lanes = data[start:start + nblocks * 32].view(np.uint64)
    for b in range(nblocks):
        v1 = _round(v1, lanes[4 * b])
        v2 = _round(v2, lanes[4 * b + 1])
        v3 = _round(v3, lanes[4 * b + 2])
        v4 = _round(v4, lanes[4 * b + 3])
    return v1, v2, v3, v4


@njit(cache=True, nogil=True, inline="always")
def _converge(v1, v2, v3, v4):
    """The four lanes of an input of 32 bytes or more, merged into one."""
    h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
    h = _merge(h, v1)
    h = _merge(h, v2)
    h = _merge(h, v3)
    return _merge(h, v4)


@njit(cache=True, nogil=True)
def _xxh64_range(data, start, length, seed):
    """xxh64 of data[start:start+length]; data is a contiguous uint8 array."""
    p = start
    if length >= 32:
        nblocks = length // 32
        v1, v2, v3, v4 = _fold_blocks(data, start, nblocks, seed + _P1 + _P2, seed + _P2, seed, seed - _P1)
        h = _converge(v1, v2, v3, v4)
        p += nblocks * 32
    else:
        h = seed + _P5
    return _fold_tail(h + np.uint64(length), data, p, start + length)


@njit(cache=True, nogil=True)
def _xxh64_many(data, offsets, out):
    """out[i] = xxh64(data[offsets[i]:offsets[i+1]])."""
    for i in range(out.shape[0]):
        out[i] = _xxh64_range(data, offsets[i], offsets[i + 1] - offsets[i], np.uint64(0))


@njit(cache=True, nogil=True)
def _xxh64_blocks(state, data, start, length):
    """Fold whole 32-byte blocks of data[start:start+length] into state[0:4]."""
    nblocks = length // 32
    state[0], state[1], state[2], state[3] = _fold_blocks(data, start, nblocks, state[0], state[1], state[2], state[3])
    return nblocks * 32


@njit(cache=True, nogil=True)
def _xxh64_finish(state, total, tail, seed):
    """Finish a streamed hash: ``tail`` holds the last ``total % 32`` bytes."""
    if total >= 32:
        h = _converge(state[0], state[1], state[2], state[3])
    else:
        h = seed + _P5
    return _fold_tail(h + np.uint64(total), tail, 0, tail.shape[0])


def _as_u8(buf) -> np.ndarray:
    if isinstance(buf, np.ndarray):
        return buf.reshape(-1).view(np.uint8)
    if len(buf) == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


def digest(buf, seed: int = 0) -> int:
    """Return the xxh64 of ``buf`` (anything exposing the buffer protocol, e.g. an mmap)."""
    arr = _as_u8(buf)
    return int(_xxh64_range(arr, 0, arr.shape[0], np.uint64(seed)))


def digest_many(buf, offsets) -> list[int]:
    """Hash consecutive pieces of ``buf``: piece i is ``buf[offsets[i]:offsets[i+1]]``.

    ``offsets`` has one more element than there are pieces. Returns one
    xxh64 per piece, computed in a single compiled call.
    """
    arr = _as_u8(buf)
    offs = np.asarray(offsets, dtype=np.int64)
    if offs.shape[0] < 1 or (offs.shape[0] > 1 and (offs[0] < 0 or offs[-1] > arr.shape[0])):
        raise ValueError("offsets out of range")
    out = np.empty(max(offs.shape[0] - 1, 0), dtype=np.uint64)
    _xxh64_many(arr, offs, out)
    return [int(x) for x in out]


class Hasher:
    """Incremental xxh64: ``update`` with pieces of data, then ``digest``.

    Pieces whose length is a multiple of 32 go straight through the compiled
    loop; anything else is carried over in a small buffer.
    """

    __slots__ = ("_state", "_total", "_carry", "_seed")

    def __init__(self, seed: int = 0):
        m = (1 << 64) - 1
        self._state = np.array(
            [(seed + _R1 + _R2) & m, (seed + _R2) & m, seed & m, (seed - _R1) & m], dtype=np.uint64
        )
        self._total = 0
        self._carry = b""
        self._seed = seed

    def update(self, buf) -> None:
        """Add the bytes of ``buf`` (any buffer) to the hash."""
        arr = _as_u8(buf)
        n = arr.shape[0]
        self._total += n
        if self._carry:
            need = 32 - len(self._carry)
            self._carry += arr[:need].tobytes()
            arr = arr[need:]
            if len(self._carry) < 32:
                return
            _xxh64_blocks(self._state, np.frombuffer(self._carry, dtype=np.uint8), 0, 32)
            self._carry = b""
        done = _xxh64_blocks(self._state, arr, 0, arr.shape[0])
        if done < arr.shape[0]:
            self._carry = arr[done:].tobytes()

    def digest(self) -> int:
        """The xxh64 of everything added so far."""
        tail = np.frombuffer(self._carry, dtype=np.uint8) if self._carry else np.zeros(0, np.uint8)
        return int(_xxh64_finish(self._state, self._total, tail, np.uint64(self._seed)))


def file_digests(fd: int, size: int, chunk_size: int) -> list[int]:
    """xxh64 of each ``chunk_size`` piece of the open file ``fd`` of ``size`` bytes.

    The file is mapped a chunk at a time, never read into Python bytes. A
    file of at most one chunk (including an empty one) gives one digest.
    """
    if size == 0:
        return [digest(b"")]
    return [chunk_digest(fd, off, min(chunk_size, size - off)) for off in range(0, size, chunk_size)]


def chunk_digest(fd: int, offset: int, length: int) -> int:
    """xxh64 of ``length`` bytes of file ``fd`` at ``offset`` (a multiple of the page size)."""
    if length == 0:
        return digest(b"")
    with mmap.mmap(fd, length, offset=offset, prot=mmap.PROT_READ) as mm:
        return digest(mm)


def warm_up() -> None:
    """Load every compiled function now (from numba's cache), so the first real call is fast."""
    data = np.zeros(64, dtype=np.uint8)
    digest(data)
    digest_many(data, [0, 32, 64])
    h = Hasher()
    h.update(data)
    h.digest()


# ---- reference implementation (pure Python, for tests) ----

_M64 = (1 << 64) - 1
_R1, _R2, _R3, _R4, _R5 = (int(p) for p in (_P1, _P2, _P3, _P4, _P5))


def _rotl_ref(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _round_ref(acc: int, lane: int) -> int:
    acc = (acc + lane * _R2) & _M64
    return (_rotl_ref(acc, 31) * _R1) & _M64


def _merge_ref(acc: int, val: int) -> int:
    acc ^= _round_ref(0, val)
    return (acc * _R1 + _R4) & _M64


def xxh64_reference(data: bytes, seed: int = 0) -> int:
    """Straightforward pure-Python xxh64, the yardstick for the compiled one."""
    n = len(data)
    p = 0
    if n >= 32:
        v1 = (seed + _R1 + _R2) & _M64
        v2 = (seed + _R2) & _M64
        v3 = seed & _M64
        v4 = (seed - _R1) & _M64
        while p <= n - 32:
            v1 = _round_ref(v1, int.from_bytes(data[p:p + 8], "little"))
            v2 = _round_ref(v2, int.from_bytes(data[p + 8:p + 16], "little"))
            v3 = _round_ref(v3, int.from_bytes(data[p + 16:p + 24], "little"))
            v4 = _round_ref(v4, int.from_bytes(data[p + 24:p + 32], "little"))
            p += 32
        h = (_rotl_ref(v1, 1) + _rotl_ref(v2, 7) + _rotl_ref(v3, 12) + _rotl_ref(v4, 18)) & _M64
        for v in (v1, v2, v3, v4):
            h = _merge_ref(h, v)
    else:
        h = (seed + _R5) & _M64
    h = (h + n) & _M64
    while p + 8 <= n:
        h ^= _round_ref(0, int.from_bytes(data[p:p + 8], "little"))
        h = (_rotl_ref(h, 27) * _R1 + _R4) & _M64
        p += 8
    if p + 4 <= n:
        h ^= (int.from_bytes(data[p:p + 4], "little") * _R1) & _M64
        h = (_rotl_ref(h, 23) * _R2 + _R3) & _M64
        p += 4
    while p < n:
        h ^= (data[p] * _R5) & _M64
        h = (_rotl_ref(h, 11) * _R1) & _M64
        p += 1
    h ^= h >> 33
    h = (h * _R2) & _M64
    h ^= h >> 29
    h = (h * _R3) & _M64
    h ^= h >> 32
    return h
