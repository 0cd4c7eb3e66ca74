"""Checksums of the data path (XXH3-64) and where numba keeps the compiled batch code."""

import os
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest

from cm.transfer import checksum
from cm.transfer.checksum import Hasher, digest, digest_many

from .conftest import CHUNK, REPO

SIZES = [0, 1, 3, 4, 7, 8, 31, 32, 33, 63, 64, 240, 241, 1000, 1 << 20, CHUNK - 1, CHUNK, CHUNK + 1]


def test_known_vectors():
    # XXH3_64bits of these inputs, seed 0, as published with the reference implementation
    assert digest(b"") == 0x2D06800538D394C2
    assert digest(b"a") == 0xE6C632B61E964E1F
    assert digest(b"abc") == 0x78AF5F94892F3950
    assert digest(b"", seed=1) != digest(b"")


@pytest.mark.parametrize("size", SIZES)
def test_every_kind_of_buffer_gives_the_same_digest(size, tmp_path):
    data = os.urandom(size)
    want = digest(data)
    assert digest(bytearray(data)) == digest(memoryview(data)) == want
    shifted = np.frombuffer(b"\x00" + data, dtype=np.uint8)[1:]  # unaligned start, as in a batch of packed files
    assert digest(shifted) == want
    if size:
        (tmp_path / "f").write_bytes(data)
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        try:
            assert checksum.chunk_digest(fd, 0, size) == want  # from a mapping of the file
        finally:
            os.close(fd)


@pytest.mark.parametrize("step", [1, 5, 32, 4096, CHUNK])
def test_incremental_hash_matches_one_shot(step):
    data = os.urandom(min(CHUNK, 2000 * step) + 77)
    h = Hasher()
    for pos in range(0, len(data), step):
        h.update(data[pos:pos + step])
    assert h.digest() == digest(data)
    h.update(b"x")
    assert h.digest() == digest(data + b"x")


def test_many_pieces_hash_in_one_call():
    pieces = [os.urandom(n) for n in (0, 1, 31, 32, 33, 5000, 0)]
    offsets = np.cumsum([0] + [len(p) for p in pieces])
    assert digest_many(b"".join(pieces), offsets) == [digest(p) for p in pieces]
    assert len(set(digest_many(b"".join(pieces), offsets)[1:6])) == 5
    with pytest.raises(ValueError):
        digest_many(b"abc", [0, 4])
    with pytest.raises(ValueError):
        digest_many(b"abc", [2, 1])


def test_file_digests_cover_each_chunk(tmp_path):
    data = os.urandom(3 * 4096 + 10)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = checksum.file_digests(fd, len(data), 4096)
    finally:
        os.close(fd)
    assert got == [digest(data[i:i + 4096]) for i in range(0, len(data), 4096)]


def test_compile_cache_falls_back_when_the_cache_dir_is_not_writable(tmp_path):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where a directory should be")
    code = ("import os; from cm.transfer import batchio; batchio.warm_up_writing(); "
            "print(len(batchio.scratch()), os.environ['NUMBA_CACHE_DIR'])")
    env = dict(os.environ, PYTHONPATH=str(REPO), NUMBA_CACHE_DIR=str(blocked / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    value, cache_dir = out.stdout.split()
    assert int(value) == 96  # it compiled and ran
    assert cache_dir != str(blocked / "cache")


def test_a_cache_directory_planted_by_another_user_is_not_used():
    """numba loads compiled code from its cache: a user's cache must be a directory only they can write."""
    import pwd

    from cm.transfer.jit import _private_dir

    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    nobody = pwd.getpwnam("nobody")
    import tempfile

    planted = Path(tempfile.mkdtemp(prefix="cmt-planted-"))
    planted.chmod(0o777)  # root's and writable by everyone: what another user could leave under the shared name

    mine = Path(tempfile.gettempdir()) / f"cmt-cache-{os.getpid()}"  # where every user may make a directory
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            got = [str(_private_dir(planted)), str(_private_dir(mine)), str(_private_dir(mine))]
            os.write(w, "\n".join(got).encode())
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 65536).decode().split("\n")
    os.waitpid(pid, 0)
    assert got[0] != str(planted) and os.stat(got[0]).st_uid == nobody.pw_uid
    assert got[1] == got[2] == str(mine) and os.stat(mine).st_uid == nobody.pw_uid
    for d in (got[0], mine, planted):
        os.rmdir(d)
