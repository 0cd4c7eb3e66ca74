"""Benchmark: a sparse file through the mover, beside ``rsync -S`` and ``cp --sparse=always``.

    python bench/bench_sparse.py [--gib 100] [--data-mib 1] [--dir DIR] [--reps 3]

A file of --gib GiB logical holding --data-mib MiB of data (half in the
middle, half at the end: ``tests/treegen.make_sparse``) is synced by one
sender process (``python -m cm.transfer.send``, 64 MiB chunks) to an
in-process receiver, on --dir (default: the disk, under /tmp). Printed: the
sender's wall time (median of --reps, each into a fresh destination), the
bytes it sent and the bytes the copy occupies (st_blocks), and the same for
``rsync -S`` (local, which reads every byte of the holes) and
``cp --sparse=always``. Everything made is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from cm.transfer.receiver import TransferServer  # noqa: E402
from treegen import blocks, make_sparse  # noqa: E402

CHUNK = 64 << 20


def cm_sync(server: TransferServer, src: Path, dst: Path) -> tuple[float, int]:
    tid, token = "b-" + secrets.token_hex(4), secrets.token_hex(16)
    server.register(tid, token, dst, "/")
    spec = {"transfer_id": tid, "token": token, "src_root": str(src), "src_path": "/", "dst_host": "127.0.0.1",
            "dst_port": server.port, "chunk_size": CHUNK}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cm.transfer.send"], input=json.dumps(spec), capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    server.unregister(tid)
    return took, json.loads(proc.stdout.splitlines()[-1])["bytes_sent"]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=100)
    ap.add_argument("--data-mib", type=float, default=1)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peers", action="store_true", help="also rsync -S and cp (they read every hole: slow)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cm-bench-sparse-", dir=args.dir))
    server = TransferServer("127.0.0.1", 0, chunk_size=CHUNK)
    server.start()
    try:
        src = work / "src"
        src.mkdir()
        logical = int(args.gib * (1 << 30))
        make_sparse(src / "sparse.bin", logical, int(args.data_mib * (1 << 20)))
        print(f"{args.gib:g} GiB logical, {blocks(src / 'sparse.bin') / (1 << 20):.1f} MiB allocated, on {work}")
        runs = []
        for rep in range(args.reps):
            dst = work / f"cm{rep}"
            dst.mkdir()
            took, sent = cm_sync(server, src, dst)
            runs.append(took)
            occupied = blocks(dst / "sparse.bin")
            shutil.rmtree(dst)
        print(f"cm     {statistics.median(runs):7.2f} s (min {min(runs):.2f}), sent {sent / (1 << 20):.1f} MiB, "
              f"the copy occupies {occupied / (1 << 20):.1f} MiB")
        if args.peers:
            for name, cmd in (("rsync -S", ["rsync", "-S", str(src / "sparse.bin"), str(work / "rsync.bin")]),
                              ("cp", ["cp", "--sparse=always", str(src / "sparse.bin"), str(work / "cp.bin")])):
                took = timed(cmd)
                out = work / ("rsync.bin" if name.startswith("rsync") else "cp.bin")
                print(f"{name:8} {took:7.2f} s, the copy occupies {blocks(out) / (1 << 20):.1f} MiB")
                out.unlink()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
