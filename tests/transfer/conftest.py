"""Fixtures for the mover: an in-process receiver, a sender subprocess, trees to copy."""

from __future__ import annotations

import json
import os
import stat
import secrets
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from cm.transfer import frames
from cm.transfer.checksum import digest
from cm.transfer.receiver import TransferServer
from cm.transfer.sender import Sender
from cm.transfer.spec import Spec
from cm.transfer.wire import Channel

REPO = Path(__file__).resolve().parents[2]
CHUNK = 64 << 10  # small chunks so that modest files span many of them


@dataclass
class Endpoint:
    """A running receiver and the transfer registered on it."""

    server: TransferServer
    transfer_id: str
    token: str
    root: Path
    dst_path: str

    @property
    def dst(self) -> Path:
        return self.root / self.dst_path.strip("/")


@pytest.fixture
def roots(tmp_path):
    """(source data root, destination data root), both empty."""
    src, dst = tmp_path / "src-root", tmp_path / "dst-root"
    src.mkdir()
    dst.mkdir()
    return src, dst


@pytest.fixture
def receiver(roots):
    """A started TransferServer with one transfer registered to write dst-root/out."""
    server = TransferServer("127.0.0.1", 0, chunk_size=8 << 20)
    server.start()
    ep = Endpoint(server, "t-" + secrets.token_hex(4), secrets.token_hex(16), roots[1], "/out")
    server.register(ep.transfer_id, ep.token, ep.root, ep.dst_path)
    yield ep
    server.stop()


def spec_for(ep: Endpoint, src_root: Path, **overrides) -> dict:
    """A sender spec aimed at ``ep``, copying the whole of ``src_root``."""
    spec = {
        "transfer_id": ep.transfer_id, "token": ep.token, "src_root": str(src_root), "src_path": "/",
        "dst_host": "127.0.0.1", "dst_port": ep.server.port, "rank": 0, "nranks": 1,
        "policy": "round-robin", "delete": False, "dry_run": False, "checksum": False,
        "exclude": [], "bwlimit": None, "streams": 3, "chunk_size": CHUNK,
    }
    spec.update(overrides)
    return spec


def sender_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


@dataclass
class SendResult:
    returncode: int
    report: dict | None
    progress: list[dict]
    stderr: str


def start_sender(spec: dict, env: dict | None = None) -> subprocess.Popen:
    """Start ``python -m cm.transfer.send`` with ``spec`` on its stdin."""
    proc = subprocess.Popen([sys.executable, "-m", "cm.transfer.send"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=sender_env(env))
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    proc.stdin = None  # written and closed: communicate() must not touch it again
    return proc


def finish(proc: subprocess.Popen, timeout: float = 60) -> SendResult:
    """Wait for a sender and parse what it printed."""
    out, err = proc.communicate(timeout=timeout)
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    report = lines[-1] if lines and lines[-1].get("done") else None
    progress = [line for line in lines if not line.get("done")]
    return SendResult(proc.returncode, report, progress, err)


def run_sender(spec: dict, env: dict | None = None, expect_ok: bool = True) -> SendResult:
    """Run a sender to the end; with ``expect_ok`` it must succeed."""
    result = finish(start_sender(spec, env))
    if expect_ok:
        assert result.returncode == 0, result.stderr
        assert result.report is not None
    return result


def send_in_process(spec: dict, channel: type[Channel] = Channel) -> dict:
    """Run a sender in this process (its connections of class ``channel``); returns its report."""
    sender = Sender(Spec.from_dict(spec), lambda progress: None, channel=channel)
    report = sender.run()
    assert not sender.stats.errors, sender.stats.errors
    return report


class _Told:
    """A hasher that has been told the digest already: what it is fed does not change it."""

    def __init__(self, digest: int):
        self._digest = digest

    def update(self, piece) -> None:
        pass

    def digest(self) -> int:
        return self._digest


def spoiling(path: str, index: int = 0) -> type[Channel]:
    """A Channel class that flips the first byte of chunk ``index`` of ``path`` (a small file: index 0) once.

    The byte is flipped on the wire, after the digest of the true data was
    taken, as a bad link or bad memory would: the receiver must catch it.
    """
    armed = [True]
    lock = threading.Lock()

    def take(p: bytes, i: int) -> bool:
        with lock:
            if armed[0] and (os.fsdecode(p), i) == (path, index):
                armed[0] = False
                return True
            return False

    class Spoiling(Channel):
        def send_stream(self, frame, data, hasher, pace=None, sent=None):
            if not take(frame.path, frame.index):
                return super().send_stream(frame, data, hasher, pace, sent)
            with memoryview(data) as view:
                hasher.update(view)
                spoiled = bytearray(view)
            spoiled[0] ^= 0xFF
            return super().send_stream(frame, spoiled, _Told(hasher.digest()), pace, sent)

        def send(self, frame, payload=None, kind=None):
            if isinstance(frame, frames.Batch) and payload is not None:
                pos = 0
                for row in frame.files:
                    if row.size and take(row.path, 0):
                        payload[pos] ^= 0xFF
                    pos += row.size
            return super().send(frame, payload, kind)

    return Spoiling


def write(path: Path, data: bytes, mode: int | None = None, mtime: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mode is not None:
        path.chmod(mode)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def make_tree(top: Path, small_files: int = 2000) -> None:
    """Files bigger than a chunk, many small files, empty files and dirs, symlinks, odd names and modes."""
    rnd = secrets.token_bytes
    write(top / "big" / "huge.bin", rnd(CHUNK * 9 + 123))
    write(top / "big" / "exact.bin", rnd(CHUNK * 4))
    write(top / "edge" / "chunk-1", rnd(CHUNK - 1))
    write(top / "edge" / "chunk", rnd(CHUNK))
    write(top / "edge" / "chunk+1", rnd(CHUNK + 1))
    for i in range(small_files):
        write(top / "small" / f"d{i % 20:02d}" / f"f{i:05d}.dat", rnd(1 + (i * 37) % 3000))
    write(top / "empty-file", b"")
    (top / "empty-dir" / "nested-empty").mkdir(parents=True)
    write(top / "ünïcödé" / "日本語 ファイル.txt", "こんにちは".encode())
    write(top / "odd names" / "with\nnewline and spaces ", b"odd")
    write(top / "modes" / "private", b"600", mode=0o600)
    write(top / "modes" / "script.sh", b"#!/bin/sh\n", mode=0o755)
    write(top / "modes" / "readonly", b"444", mode=0o444)
    write(top / "old", b"old mtime", mtime=1_000_000_000)
    (top / "links").mkdir()
    os.symlink("../old", top / "links" / "relative")
    os.symlink("/etc/hostname", top / "links" / "outside")
    os.symlink("no-such-target", top / "links" / "dangling")
    os.symlink("../big", top / "links" / "dir-link")
    (top / "modes" / "ro-dir").mkdir()
    write(top / "modes" / "ro-dir" / "inside", b"x")
    (top / "modes" / "ro-dir").chmod(0o555)
    os.utime(top / "modes", (1_100_000_000, 1_100_000_000))


def tree_state(top: Path) -> dict:
    """Everything a sync must reproduce, found without cm's walker (an oracle of its own): for every path
    under top (top itself as ""), its kind, owner, group, mode, nanosecond mtime (files, directories and
    links), size, link target and content digest."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in ["", *dirnames, *filenames] if dirpath == str(top) else [*dirnames, *filenames]:
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, top) if name else ""
            st = os.lstat(path)
            kind = "l" if stat.S_ISLNK(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode) else "f"
            target = os.readlink(path) if kind == "l" else None
            content = None
            if kind == "f":
                with open(path, "rb") as f:
                    content = digest(f.read())
            out[rel] = (kind, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode),
                        st.st_mtime_ns if kind != "d" or rel else None,  # the top's own mtime is the caller's
                        st.st_size if kind == "f" else None, target, content)
    return out


def assert_same_tree(a: Path, b: Path) -> None:
    sa, sb = tree_state(a), tree_state(b)
    assert sa.keys() == sb.keys(), (sorted(sa.keys() - sb.keys())[:5], sorted(sb.keys() - sa.keys())[:5])
    diffs = [(p, sa[p], sb[p]) for p in sa if sa[p] != sb[p]]
    assert not diffs, diffs[:5]
