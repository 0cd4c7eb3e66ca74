"""Benchmark: what the data plane's authentication and encryption cost, beside the code before them.

    python bench/bench_secure.py [--old REPO] [--reps 5] [--size MiB] [--files N]

One sender (``python -m cm.transfer.send``, 4 streams, 64 MiB chunks) to one
mover process (``cm.node.mover.Mover``: ``python -m cm.transfer.receiver``)
on loopback, as a sync between two nodes does it, without the head and the
scheduler around them. Configurations, run in rotation each repetition:
  old        the code in --old (e.g. a worktree of the commit before), if given
  auth       records authenticated only (CM_DATA_ENCRYPT=false: GMAC tags)
  encrypt    records encrypted (AES-256-GCM, the default)
Scenarios: (a) one file of --size MiB (default 2048; the source on the
disk under /tmp, read once so it is cached; the destination on tmpfs and
removed after each run), (b) --files files of 4-12 KiB in 100 directories.
Each run is a fresh destination. Prints the median seconds (min-max) and
each configuration's cost against ``old``; the load average is printed too,
since a shared machine decides much of the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench_sync import make_big, make_small, warm  # noqa: E402

WORKER = r"""
import json, os, resource, subprocess, sys, time
from pathlib import Path
import psutil
from cm.creds import Identity
from cm.node.mover import Mover
src_root, dst_root, encrypt = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
try:
    mover = Mover("127.0.0.1", 0, chunk_size=64 << 20, log_level="WARNING", encrypt=encrypt)
except TypeError:  # the code before: no such setting
    mover = Mover("127.0.0.1", 0, chunk_size=64 << 20, log_level="WARNING")
mover.start()
me = Identity(os.geteuid(), os.getegid(), tuple(os.getgroups()))
mover.register("b.1", "0123456789abcdef0123456789abcdef", Path(dst_root), "/out", me)
spec = {"transfer_id": "b.1", "token": "0123456789abcdef0123456789abcdef", "src_root": src_root, "src_path": "/",
        "dst_host": "127.0.0.1", "dst_port": mover.port, "streams": 4, "chunk_size": 64 << 20}
def cpu_now():
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = psutil.Process(mover.proc.pid).cpu_times()
    return c.ru_utime + c.ru_stime + m.user + m.system
cpu0, started = cpu_now(), time.perf_counter()
proc = subprocess.run([sys.executable, "-m", "cm.transfer.send"], input=json.dumps(spec), text=True,
                      capture_output=True)
took, cpu = time.perf_counter() - started, cpu_now() - cpu0
mover.stop()
if proc.returncode != 0:
    sys.exit(f"sender failed: {proc.stderr}")
print(json.dumps({"seconds": took, "cpu": cpu}))
"""


def run_once(repo: Path, src: Path, dst: Path, encrypt: bool) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    env["PYTHONPATH"] = str(repo)
    out = subprocess.run([sys.executable, "-c", WORKER, str(src), str(dst), "1" if encrypt else "0"],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip()[-2000:])
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return got["seconds"], got["cpu"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, help="a checkout of the code before (compared as 'old')")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size", type=int, default=2048, help="MiB of scenario (a)")
    ap.add_argument("--files", type=int, default=20000, help="files of scenario (b)")
    ap.add_argument("--scenarios", default="ab")
    args = ap.parse_args()
    configs = ([("old", args.old, True)] if args.old else []) + [("auth", REPO, False), ("encrypt", REPO, True)]
    work = Path(tempfile.mkdtemp(prefix="cm-bench-secure-", dir="/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="cm-bench-secure-", dir="/dev/shm"))
    results: dict = {}
    try:
        for scen in args.scenarios:
            src = work / f"src-{scen}"
            src.mkdir()
            if scen == "a":
                make_big(src / "big.bin", args.size << 20)
            else:
                make_small(src, args.files)
            warm(src)
            dst_root = shm if scen == "a" else work
            times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
            cpus: dict[str, list[float]] = {name: [] for name, _, _ in configs}
            for rep in range(args.reps):
                order = configs[rep % len(configs):] + configs[:rep % len(configs)]
                for name, repo, encrypt in order:
                    dst = dst_root / "dst"
                    dst.mkdir()
                    try:
                        wall, cpu = run_once(repo, src, dst, encrypt)
                        times[name].append(wall)
                        cpus[name].append(cpu)
                    finally:
                        shutil.rmtree(dst, ignore_errors=True)
                print(f"  ({scen}) rep {rep + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f}s/{cpus[n][-1]:.2f}cpu"
                                                              for n in times),
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
            results[scen] = (times, cpus)
            shutil.rmtree(src, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    print(f"\nmedians (min-max) of {args.reps} reps: wall seconds of the sender's run, and CPU seconds of "
          f"sender + mover in it; load average now {os.getloadavg()}")
    for scen, (times, cpus) in results.items():
        label = f"(a) one {args.size} MiB file" if scen == "a" else f"(b) {args.files} small files"
        base = {k: statistics.median(v["old"]) for k, v in (("wall", times), ("cpu", cpus)) if "old" in v}
        for name in times:
            line = f"{label:28} {name:8}"
            for kind, ts in (("wall", times[name]), ("cpu", cpus[name])):
                med = statistics.median(ts)
                cost = f" {100 * (med / base[kind] - 1):+6.1f}%" if kind in base and name != "old" else " " * 8
                line += f"  {kind} {med:7.2f} s ({min(ts):.2f}-{max(ts):.2f}){cost}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
