"""Benchmark: the passes over the bytes of a large file, each alone, and cm's data path made of them.

    python bench/bench_datapath.py [--size MiB] [--dir DIR] [--reps N]

cm moves a large file in chunks; per piece (1 MiB) of a chunk the sender
hashes the mapped piece and hands it to the socket right after, while it is
hot in the CPU cache (``wire.Channel.send_stream``); the receiver reads each
piece (256 KiB) from the socket into one reused buffer, hashes it and
``pwrite``s it into the destination file (``recv_stream_to_fd``). So the
bytes cross memory: sender 1 read (hash) + 1 copy (into the socket); the
kernel's loopback; receiver 1 copy (out of the socket) + 1 read (hash,
cached) + 1 copy (into the page cache). This prints what each of those
passes costs alone (CPU seconds and wall time per GiB, medians of --reps)
and what the path costs when they run together, beside ``cp`` (the local
floor) and alternatives that would remove a copy (``sendfile`` on the
sender; receiving straight into the destination's mapping), so a change to
the data path can be judged by numbers from the same run.

The file lives on --dir (default: a tmpfs under /dev/shm, so storage does
not decide); everything made is removed at the end.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cm.transfer.checksum import Hasher  # noqa: E402
from cm.transfer.receiver import RECV_PIECE  # noqa: E402  (what the mover receives a piece in)
from cm.transfer.wire import PIECE as SEND_PIECE  # noqa: E402  (what a sender sends a piece in)

MiB = 1 << 20


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def timed(fn) -> tuple[float, float]:
    c, t = cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - t, cpu() - c


def make_file(path: Path, size: int) -> None:
    block = os.urandom(64 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def loopback() -> tuple[socket.socket, socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    srv.close()
    return a, b


def receiver(sock: socket.socket, size: int, out_fd: int | None, hash_it: bool, into_map: mmap.mmap | None):
    def run():
        buf = bytearray(RECV_PIECE)
        view = memoryview(buf)
        h = Hasher() if hash_it else None
        got = 0
        while got < size:
            if into_map is not None:
                target = memoryview(into_map)[got:got + min(RECV_PIECE, size - got)]
                n = sock.recv_into(target)
                if h is not None:
                    h.update(target[:n])
                target.release()
            else:
                n = sock.recv_into(view, min(RECV_PIECE, size - got))
                piece = view[:n]
                if h is not None:
                    h.update(piece)
                if out_fd is not None:
                    written = 0
                    while written < n:
                        written += os.pwrite(out_fd, piece[written:], got + written)
            got += n
    return threading.Thread(target=run)


def scenarios(src: Path, dst: Path, size: int) -> dict:
    fd = os.open(src, os.O_RDONLY)
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    view = memoryview(mm)

    def read_pass():  # the page cache is warm: this is the mapping's cost and one copy out of it
        for pos in range(0, size, SEND_PIECE):
            bytes(view[pos:pos + SEND_PIECE])

    def hash_pass():
        h = Hasher()
        for pos in range(0, size, SEND_PIECE):
            h.update(view[pos:pos + SEND_PIECE])

    def write_pass():
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for pos in range(0, size, RECV_PIECE):
                os.pwrite(out, view[pos:pos + RECV_PIECE], pos)
        finally:
            os.close(out)
        dst.unlink()

    def network(sender: str, hash_send: bool, hash_recv: bool, write: str):
        def run():
            a, b = loopback()
            out = None
            into = None
            if write == "pwrite":
                out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            elif write == "mmap":
                out = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(out, size)
                into = mmap.mmap(out, size)
            rx = receiver(b, size, out if write == "pwrite" else None, hash_recv, into)
            rx.start()
            h = Hasher() if hash_send else None
            if sender == "send":
                for pos in range(0, size, SEND_PIECE):
                    piece = view[pos:pos + SEND_PIECE]
                    if h is not None:
                        h.update(piece)
                    a.sendall(piece)
            else:
                if h is not None:
                    for pos in range(0, size, SEND_PIECE):
                        h.update(view[pos:pos + SEND_PIECE])
                off = 0
                while off < size:
                    off += os.sendfile(a.fileno(), fd, off, size - off)
            rx.join()
            a.close()
            b.close()
            if into is not None:
                into.close()
            if out is not None:
                os.close(out)
                dst.unlink()
        return run

    def cp():
        subprocess.run(["cp", str(src), str(dst)], check=True)
        dst.unlink()

    rows = {
        "read (mapping, copy out)": read_pass,
        "XXH3 hash": hash_pass,
        "pwrite into a new file": write_pass,
        "TCP loopback: send + recv": network("send", False, False, ""),
        "TCP loopback: sendfile + recv": network("sendfile", False, False, ""),
        "cm's path: hash+send | recv+hash+pwrite": network("send", True, True, "pwrite"),
        "  with sendfile on the sender": network("sendfile", True, True, "pwrite"),
        "  receiving into the file's mapping": network("send", True, True, "mmap"),
        "cp (the local floor)": cp,
    }
    try:
        yield from rows.items()
    finally:
        view.release()
        mm.close()
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="file size in MiB (default 1024)")
    ap.add_argument("--dir", default="/dev/shm", help="where the file is made (default /dev/shm: tmpfs)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    size = args.size * MiB
    top = Path(tempfile.mkdtemp(prefix="cm-datapath-", dir=args.dir))
    try:
        src, dst = top / "src.bin", top / "dst.bin"
        make_file(src, size)
        gib = size / (1 << 30)
        print(f"data path, {args.size} MiB on {args.dir} ({os.cpu_count()} CPUs), medians of {args.reps}; "
              "CPU is user+system of every thread and child")
        print(f"{'pass':44} {'wall s/GiB':>11} {'CPU s/GiB':>10} {'GiB/s':>7}")
        results = {}
        for _ in range(args.reps):
            for name, fn in scenarios(src, dst, size):
                results.setdefault(name, []).append(timed(fn))
        for name, runs in results.items():
            wall = statistics.median(w for w, _ in runs) / gib
            used = statistics.median(c for _, c in runs) / gib
            print(f"{name:44} {wall:11.3f} {used:10.3f} {1 / wall:7.2f}")
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
