"""Where a `cmsync --wait` spends its time: py-spy on both nodes of a local cluster during one sync.

    python bench/profile_sync.py [--dir /dev/shm/cm-profile] [--big-mib 2048] [--files 20000]

Starts a cluster (partitions src and dst, its own database) whose data is
under ``--dir``, makes (a) one big file and (b) many small files, runs one
warm-up sync, then for each of (a) and (b) runs ``py-spy record
--subprocesses`` (on-CPU samples, Python frames: numba's compiled code shows
as the Python function that calls it) on the sending node's daemon (its senders) and on the
receiving node's daemon (its mover) during one ``cmsync --wait``, and
prints, per process, the functions with the most samples (self and
inclusive). Needs py-spy (``pip install py-spy``) and root (ptrace). The
cluster and the data are removed at the end, also on SIGTERM and Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_peers import Cm  # noqa: E402
from bench_sync import MiB, make_big, make_small  # noqa: E402

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def record(pid: int, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([PY_SPY, "record", "--subprocesses", "--rate", "100", "--format", "raw",
                             "--pid", str(pid), "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    return proc


def report(path: Path, top: int) -> None:
    """Per process: total samples, the most sampled leaf frames, and the heaviest cm functions inclusive."""
    per_proc: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        last = max(i for i, f in enumerate(frames) if f.startswith("process "))  # parents first, then the process
        proc = re.sub(r"^process (\d+):\"?(.*?)\"?$", r"pid \1 \2", frames[last])[:90]
        n = int(count)
        totals[proc] += n
        frames = [re.sub(r" \((.*/)?([^/]+:\d+)\)$", r" (\2)", f) for f in frames[last + 1:]]
        if frames:
            per_proc[proc][frames[-1]] += n
        for f in set(re.sub(r":\d+\)$", ")", f) for f in frames):  # a function counted once per stack
            m = re.search(r"\((\w+)\.py\)$", f)
            if m and m.group(1) in CM_MODULES:
                incl[proc][f] += n
    for proc, total in totals.most_common():
        if total < 20:
            continue
        print(f"\n  {proc}: {total} samples on CPU at 100/s (= {total / 100:.1f} CPU-s)")
        print("    self:      " + "\n               ".join(f"{n / total:5.1%} {f}" for f, n in per_proc[proc].most_common(top)))
        print("    inclusive: " + "\n               ".join(f"{n / total:5.1%} {f}" for f, n in incl[proc].most_common(top)))


CM_MODULES = {p.stem for p in (Path(__file__).resolve().parents[1] / "cm" / "transfer").glob("*.py")} | \
    {p.stem for p in (Path(__file__).resolve().parents[1] / "cm" / "node").glob("*.py")}


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/dev/shm/cm-profile")
    ap.add_argument("--big-mib", type=int, default=2048)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    base = Path(args.dir)
    if base.exists():
        shutil.rmtree(base)
    src = base / "data" / "src"
    make_big(src / "a" / "big.bin", args.big_mib * MiB)
    make_small(src / "b", args.files)
    make_small(src / "one", 1, ndirs=1)
    (base / "data" / "dst").mkdir(parents=True)
    cm = Cm(base / "data")
    try:
        cm.up()
        cm.sync("one", "warm-up")
        nodes = {name: int(cm.cluster.pidfile(name).read_text()) for name in ("computenode-1", "computenode-2")}
        for scen in "a", "b", "c":  # (c): (b) again into the same copy, nothing to send
            outs, spies = [], []
            for name, pid in nodes.items():
                outs.append(base / f"{scen}-{name}.txt")
                spies.append(record(pid, outs[-1]))
            t, bd = cm.sync("b" if scen == "c" else scen, "b-profiled" if scen == "c" else f"{scen}-profiled")
            time.sleep(0.3)
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            print(f"\n== ({scen}) cmsync --wait {t * 1000:.0f} ms; breakdown (ms): "
                  + ", ".join(f"{k} {v * 1000:.0f}" for k, v in bd.items() if k not in ("bytes_sent", "files_sent")))
            for name, out in zip(nodes, outs):
                print(f" {name} ({'sender' if name == 'computenode-1' else 'receiver'} side):")
                if out.exists():
                    report(out, args.top)
                else:
                    print("  py-spy wrote nothing (needs root and ptrace)")
    finally:
        cm.down()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
