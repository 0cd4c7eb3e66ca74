"""The compiled xxh64 agrees with the reference and with published test vectors."""

import os
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest

from cm.transfer import checksum
from cm.transfer.checksum import Hasher, digest, digest_many, xxh64_reference

from .conftest import CHUNK, REPO

SIZES = [0, 1, 3, 4, 7, 8, 31, 32, 33, 63, 64, 1000, 1 << 20, CHUNK - 1, CHUNK, CHUNK + 1]


def test_known_vectors():
    assert digest(b"") == 0xEF46DB3751D8E999
    assert xxh64_reference(b"") == 0xEF46DB3751D8E999
    assert digest(b"a") == 0xD24EC4F1A98C6E5B
    assert digest(b"abc") == 0x44BC2CF5AD770999
    assert digest(b"", seed=1) == xxh64_reference(b"", seed=1)


@pytest.mark.parametrize("size", SIZES)
def test_compiled_matches_reference_on_random_data(size):
    data = os.urandom(size)
    assert digest(data) == xxh64_reference(data)
    # unaligned start, as in a batch of packed files
    shifted = np.frombuffer(b"\x00" + data, dtype=np.uint8)[1:]
    assert digest(shifted) == xxh64_reference(data)


@pytest.mark.parametrize("step", [1, 5, 32, 4096, CHUNK])
def test_incremental_hash_matches_one_shot(step):
    data = os.urandom(min(CHUNK, 2000 * step) + 77)
    h = Hasher()
    for pos in range(0, len(data), step):
        h.update(data[pos:pos + step])
    assert h.digest() == xxh64_reference(data)


def test_many_pieces_hash_in_one_call():
    pieces = [os.urandom(n) for n in (0, 1, 31, 32, 33, 5000, 0)]
    offsets = np.cumsum([0] + [len(p) for p in pieces])
    assert digest_many(b"".join(pieces), offsets) == [xxh64_reference(p) for p in pieces]


def test_file_digests_cover_each_chunk(tmp_path):
    data = os.urandom(3 * 4096 + 10)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = checksum.file_digests(fd, len(data), 4096)
    finally:
        os.close(fd)
    assert got == [xxh64_reference(data[i:i + 4096]) for i in range(0, len(data), 4096)]


def test_compile_cache_falls_back_when_the_cache_dir_is_not_writable(tmp_path):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where a directory should be")
    code = "import os; from cm.transfer.checksum import digest; print(digest(b'abc'), os.environ['NUMBA_CACHE_DIR'])"
    env = dict(os.environ, PYTHONPATH=str(REPO), NUMBA_CACHE_DIR=str(blocked / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    value, cache_dir = out.stdout.split()
    assert int(value) == 0x44BC2CF5AD770999
    assert cache_dir != str(blocked / "cache")


def test_a_cache_directory_planted_by_another_user_is_not_used():
    """numba loads compiled code from its cache: a user's cache must be a directory only they can write."""
    import pwd

    from cm.transfer.checksum import _private_dir

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
