"""Compile numba's cache at image build time: one real sync over loopback.

A warm-up call with made-up arrays compiles other specialisations than a
real transfer (read-only mapped chunks, packed batches), so this runs the
mover itself: a TransferServer in this process, `python -m cm.transfer.send`
as a child, a tree with chunked files and a batch of small files. Every
function the mover compiles is then in NUMBA_CACHE_DIR, and the first sync
in a new container loads it instead of compiling.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

from cm.transfer import batchio
from cm.transfer.receiver import TransferServer

CHUNK = 64 << 10


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "src"), Path(tmp, "dst")
        (src / "small").mkdir(parents=True)
        dst.mkdir()
        (src / "big.bin").write_bytes(secrets.token_bytes(CHUNK * 3 + 17))
        for i in range(300):
            (src / "small" / f"f{i}").write_bytes(secrets.token_bytes(1 + i * 13))
        server = TransferServer("127.0.0.1", 0, chunk_size=CHUNK)
        server.start()
        try:
            tid, token = "warm-up", secrets.token_hex(16)
            server.register(tid, token, dst, "/out")
            spec = {"transfer_id": tid, "token": token, "src_root": str(src), "src_path": "/",
                    "dst_host": "127.0.0.1", "dst_port": server.port, "rank": 0, "nranks": 1,
                    "policy": "round-robin", "delete": False, "dry_run": False, "checksum": True,
                    "exclude": [], "bwlimit": None, "streams": 2, "chunk_size": CHUNK}
            done = subprocess.run([sys.executable, "-m", "cm.transfer.send"], input=json.dumps(spec),
                                  capture_output=True, text=True, timeout=600, env=dict(os.environ))
        finally:
            server.stop()
        if done.returncode != 0:
            print(f"warm_numba: the warm-up sync failed ({done.returncode}): {done.stderr[-2000:]}", file=sys.stderr)
            return 1
        copied = (dst / "out" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
        if not copied:
            print("warm_numba: the warm-up sync did not copy big.bin", file=sys.stderr)
            return 1
    batchio.warm_up_writing()
    batchio.warm_up_reading()
    return 0


if __name__ == "__main__":
    sys.exit(main())
