"""Benchmark: the receiver's cost per frame before any file is touched.

    python bench/bench_frames.py

(1) the fields of a BATCH frame with 500 rows, decoded and validated; (2)
the same plus the reads of every row that ``write_batch`` does before its
compiled loop; (3) the fields of one CHUNK frame, decoded and checked. It
runs against whichever ``cm`` is imported: the msgspec frames
(``cm.transfer.frames``) or, in a checkout from before them, msgpack and
the hand validators, so ``PYTHONPATH=/old/checkout python
bench/bench_frames.py`` measures the old code on the same data.
"""

import os
import statistics
import timeit

import msgpack
import numpy as np

rows = [[os.fsencode(f"small/d{i % 20:02d}/f{i:05d}.dat"), 1 + (i * 37) % 3000, 0o644, 1_700_000_000_123_456_789 + i,
         (i * 0x9E3779B97F4A7C15) % (1 << 64)] for i in range(500)]
raw = msgpack.packb({"files": rows}, use_bin_type=True)
try:
    from cm.transfer import frames
    from cm.transfer.frames import Kind

    def decode():
        return frames.decode_request(Kind.BATCH, raw).files

    def prelude(files):
        offsets = [0]
        for f in files:
            offsets.append(offsets[-1] + f.size)
        split = [f.path.rpartition(b"/") for f in files]
        bad = [i for i, f in enumerate(files) if 0 == f.digest]
        m = np.fromiter((f.mode for f in files), dtype=np.uint32, count=len(files))
        t = np.fromiter((f.mtime for f in files), dtype=np.int64, count=len(files))
    which = "new (msgspec Structs)"
except ImportError:
    from cm.transfer.receiver import _rows
    from cm.transfer.wire import _no_ext

    def decode():
        meta = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_no_ext)
        if not isinstance(meta, dict):
            raise ValueError
        return _rows(meta, "files", (bytes, int, "mode", "mtime", int))

    def prelude(files):
        offsets = [0]
        for f in files:
            offsets.append(offsets[-1] + f[1])
        split = [f[0].rpartition(b"/") for f in files]
        bad = [i for i, f in enumerate(files) if 0 == f[4]]
        m = np.fromiter((f[2] for f in files), dtype=np.uint32, count=len(files))
        t = np.fromiter((f[3] for f in files), dtype=np.int64, count=len(files))
    which = "old (msgpack + _rows)"

files = decode()
n = 2000
for name, fn in (("decode+validate", decode), ("decode+validate+row reads", lambda: prelude(decode()))):
    runs = [min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6 for _ in range(3)]
    print(f"{which:24s} {name:28s} {len(raw)} bytes: median {statistics.median(runs):7.1f} us/frame  (runs {', '.join(f'{r:.1f}' for r in runs)})")

# CHUNK: the fields of one chunk frame, decoded and checked as the receiver does before reading the payload
chunk = msgpack.packb({"path": b"big/huge.bin", "size": 1 << 30, "mode": 0o644, "mtime": 1_700_000_000_123_456_789,
                       "chunk_size": 64 << 20, "index": 3}, use_bin_type=True)
from cm.transfer.paths import wire_parts
from cm.transfer.receiver import _chunk_size
if which.startswith("new"):
    def chunk_decode():
        req = frames.decode_request(Kind.CHUNK, chunk)
        wire_parts(os.fsdecode(req.path))
        _chunk_size(req.chunk_size, 64 << 20)
        if req.uid is not None or req.gid is not None:
            raise ValueError
else:
    from cm.transfer.receiver import _SCALARS, _is_int

    def chunk_decode():
        meta = msgpack.unpackb(chunk, raw=False, strict_map_key=True, ext_hook=_no_ext)
        if not isinstance(meta, dict):
            raise ValueError
        if not isinstance(meta.get("path"), bytes):
            raise ValueError
        wire_parts(os.fsdecode(meta["path"]))
        for key in ("size", "index"):
            if not _is_int(meta.get(key)):
                raise ValueError
        if not _SCALARS["mode"](meta.get("mode")) or not _SCALARS["mtime"](meta.get("mtime")):
            raise ValueError
        _chunk_size(meta.get("chunk_size"), 64 << 20)
        if "uid" in meta or "gid" in meta:
            raise ValueError

n = 100000
runs = [min(timeit.repeat(chunk_decode, number=n, repeat=5)) / n * 1e6 for _ in range(3)]
print(f"{which:24s} {'CHUNK fields decode+checks':28s} {len(chunk)} bytes: median {statistics.median(runs):7.2f} us/frame  (runs {', '.join(f'{r:.2f}' for r in runs)})")
