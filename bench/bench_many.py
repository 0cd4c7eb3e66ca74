"""Benchmark: a no-change re-sync of a tree of many small files (300,000 by default), cm beside rsync.

    python bench/bench_many.py [--files 300000] [--reps 3] [--dir /var/tmp/cm-bench-many] [--keep-tree]

Makes ``--files`` files of 1-4 KiB, 1,000 to a directory, two levels deep,
under ``--dir`` (on the disk: 300,000 files take ~1.3 GB there, tmpfs would
hold them in memory), and starts a local cluster (database, head, two nodes
in partition ``src`` and two in ``dst``; their data is under ``--dir``).
The first copies are made by ``cmsync --wait`` (into ``cm/``) and by
``rsync -a`` to an rsync daemon on loopback (into ``rsync/``); then every
rep times, in rotating order, a no-change re-sync by each of
``cmsync --wait -n 1``, ``cmsync --wait -n 2`` (both into ``cm/``) and
``rsync -a`` (into ``rsync/``), wall clock from the command's start to its
exit, with the source read and ``sync`` run before each. While each runs,
the peak resident set (``VmHWM``) of every process on the sending and the
receiving side is read from /proc every few milliseconds: cm's senders
(forks of a zygote that already holds ~100 MiB of loaded code, counted in
their RSS) and movers (long-lived: their peak is reset through
``/proc/PID/clear_refs`` before each run), rsync's client and its daemon's
children. The cluster and (without ``--keep-tree``) the tree are removed at
the end, also on SIGTERM and Ctrl-C.

Output: median ms (min-max) per command, cm's ratio to rsync (rsync_time /
cm_time: > 1 means cm is faster), the median peak RSS per side, and the
load average before each run (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_peers import BIN, Failed, run  # noqa: E402
from bench_sync import RsyncDaemon  # noqa: E402
from cm.cluster.local import LocalCluster, parse_partitions  # noqa: E402

PER_DIR = 1000
KiB = 1024


def make_tree(top: Path, nfiles: int) -> int:
    """``nfiles`` files of 1-4 KiB, ``PER_DIR`` to a directory under top/dNN/dNNN; returns total bytes."""
    rnd = os.urandom(4 * KiB + 1024)
    total = 0
    for i in range(nfiles):
        d = i // PER_DIR
        folder = top / f"d{d // 100:02d}" / f"d{d % 100:03d}"
        if i % PER_DIR == 0:
            folder.mkdir(parents=True, exist_ok=True)
        size = KiB + (i * 7919) % (3 * KiB + 1)
        with open(folder / f"f{i:07d}", "wb") as fh:
            fh.write(rnd[i % 1024:i % 1024 + size])
        total += size
    return total


def read_tree(top: Path) -> None:
    """Stat and read everything under ``top`` (warm cache for every tool)."""
    for dirpath, _, files in os.walk(top):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                fh.read()


def _status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)
    except (FileNotFoundError, ProcessLookupError):
        return {}


def _kib(text: str) -> int:
    return int(text.split()[0]) if text else 0


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(name))
    return kids


def descendants(roots: list[int]) -> set[int]:
    kids = _children()
    out, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        for k in kids.get(pid, ()):
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


class PeakRss:
    """The highest VmHWM (KiB) seen per side while a command runs: polls the descendants of the roots of
    each side every ``every`` seconds, leaving out the pids in ``ignore`` (zygotes, daemons) and, given
    ``comm``, processes of another name."""

    def __init__(self, sides: dict[str, list[int]], ignore: set[int], comm: str = "", every: float = 0.005):
        self.sides, self.ignore, self.comm, self.every = sides, ignore, comm, every
        self.peak = {side: 0 for side in sides}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        pids: dict[str, set[int]] = {}
        rescan = 0.0
        while True:
            stopping = self._stop.is_set()
            if time.monotonic() >= rescan:  # new processes: a walk of /proc costs a few ms
                pids = {side: {p for p in (descendants(roots) | set(roots)) - self.ignore if self._named(p)}
                        for side, roots in self.sides.items()}
                rescan = time.monotonic() + 0.05
            for side, group in pids.items():
                for pid in group:
                    self.peak[side] = max(self.peak[side], _kib(_status(pid).get("VmHWM", "")))
            if stopping:
                return
            time.sleep(self.every)

    def _named(self, pid: int) -> bool:
        return not self.comm or _status(pid).get("Name") == self.comm


class Cluster:
    """A local cluster: partitions src (2 nodes) and dst (2 nodes), data under ``data``."""

    def __init__(self, data: Path):
        self.root = Path(tempfile.mkdtemp(prefix="cmmany"))  # short: Unix socket paths are limited
        os.chmod(self.root, 0o755)
        self.cluster = LocalCluster(self.root / "run", parse_partitions("src:2,dst:2", 4), data_dir=data,
                                    db_dir=self.root / "db",
                                    env={"CM_DB_NAME": f"benchmany{os.getpid()}", "CM_LOG_LEVEL": "WARNING"})
        self.env = {**os.environ, "CM_RUN_DIR": str(self.root / "run")}
        self.env.pop("CM_CONFIG", None)

    def up(self) -> None:
        self.cluster.up(timeout=120)

    def node_pid(self, name: str) -> int:
        return int(self.cluster.pidfile(name).read_text())

    def command(self, src: str, dst: str, nodes: int) -> list[str]:
        return [str(BIN / "cmsync"), "--wait", "--parsable", "-n", str(nodes), f"src:/{src}", f"dst:/{dst}"]

    def sync(self, src: str, dst: str, nodes: int) -> tuple[float, str]:
        """Wall seconds of ``cmsync --wait``, and the job id."""
        t0 = time.perf_counter()
        proc = subprocess.run(self.command(src, dst, nodes), capture_output=True, text=True, env=self.env)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise Failed(f"cmsync -n {nodes} {src} -> {dst} exited {proc.returncode}: {proc.stderr[-800:]}\n"
                         + self.cluster.tail("headnode", 10))
        return elapsed, proc.stdout.split()[0]

    def sent(self, job_id: str) -> int:
        info = subprocess.run([str(BIN / "cminfo"), "--json", job_id], capture_output=True, text=True,
                              env=self.env, check=True)
        return json.loads(info.stdout)["jobs"][0]["transfer"]["stats"]["bytes_sent"]

    def down(self) -> None:
        self.cluster.down()
        shutil.rmtree(self.root, ignore_errors=True)


def movers(node_pids: list[int]) -> list[int]:
    out = []
    for pid in descendants(node_pids):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"cm.transfer.receiver" in fh.read():
                    out.append(pid)
        except FileNotFoundError:
            continue
    return out


def reset_peak(pids: list[int]) -> None:
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as fh:
                fh.write("5\n")  # resets VmHWM to the current RSS
        except (FileNotFoundError, PermissionError):
            pass


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):7.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `finally` still stops the cluster and deletes
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=300_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp/cm-bench-many")
    ap.add_argument("--keep-tree", action="store_true", help="keep (and reuse) the source tree under --dir")
    args = ap.parse_args()
    if shutil.which("rsync") is None:
        print("rsync is not installed (Debian package rsync): nothing to compare with")
        return 1
    base = Path(args.dir)
    data = base / "data"
    src, dst, work = data / "src" / "tree", data / "dst", base / "work"
    stamp = base / f".made-{args.files}"
    if not (args.keep_tree and stamp.exists()):
        shutil.rmtree(base, ignore_errors=True)
        print(f"making {args.files:,} files of 1-4 KiB under {src} ...", flush=True)
        t0 = time.monotonic()
        make_tree(src, args.files)
        stamp.touch()
        print(f"  made in {time.monotonic() - t0:.0f} s", flush=True)
    for d in (dst, work):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} before the runs", flush=True)
    cm = Cluster(data)
    daemon = None
    times: dict[str, list[float]] = {"cm -n 1": [], "cm -n 2": [], "rsync": []}
    rss: dict[str, dict[str, list[int]]] = {tool: {"sender": [], "receiver": []} for tool in times}
    loads: list[float] = []
    try:
        cm.up()
        daemon = RsyncDaemon(dst, work)
        src_nodes = [cm.node_pid("computenode-1"), cm.node_pid("computenode-2")]
        dst_nodes = [cm.node_pid("computenode-3"), cm.node_pid("computenode-4")]
        t, _ = cm.sync("tree", "cm", 1)
        print(f"  first copy: cmsync --wait -n 1 {t * 1000:.0f} ms", flush=True)
        rsync_cmd = ["rsync", "-a", f"{src}/", f"{daemon.url}/rsync/"]
        print(f"  first copy: rsync -a {run(rsync_cmd) * 1000:.0f} ms", flush=True)
        mover_pids = movers(dst_nodes)
        zygotes = descendants(src_nodes) | set(src_nodes)  # what runs before a sync is no sender
        names = list(times)
        for rep in range(args.reps):
            for tool in names[rep % len(names):] + names[:rep % len(names)]:
                read_tree(src)
                os.sync()
                reset_peak(mover_pids)
                load = os.getloadavg()[0]
                loads.append(load)
                if tool == "rsync":
                    sides = {"sender": [os.getpid()], "receiver": [daemon.proc.pid]}
                    with PeakRss(sides, ignore={daemon.proc.pid}, comm="rsync") as peak:
                        t = run(rsync_cmd)
                else:
                    sides = {"sender": src_nodes, "receiver": mover_pids}
                    with PeakRss(sides, ignore=zygotes) as peak:
                        t, job = cm.sync("tree", "cm", int(tool[-1]))
                    if sent := cm.sent(job):
                        raise Failed(f"cm's no-change re-sync sent {sent} bytes")
                times[tool].append(t * 1000)
                for side in peak.peak:
                    rss[tool][side].append(peak.peak[side])
                print(f"  rep {rep + 1}: {tool:8} {t * 1000:7.0f} ms  peak RSS sender "
                      f"{peak.peak['sender'] >> 10:4} MiB, receiver {peak.peak['receiver'] >> 10:4} MiB  "
                      f"(load {load:.2f})", flush=True)
    finally:
        if daemon is not None:
            daemon.close()
        cm.down()
        shutil.rmtree(dst, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep_tree:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\nno-change re-sync of {args.files:,} files, median ms (min-max) of {args.reps} runs, load average "
          f"{min(loads):.1f}-{max(loads):.1f}; rsync/cm > 1: cm faster")
    rs = statistics.median(times["rsync"])
    for tool, values in times.items():
        ratio = "" if tool == "rsync" else f"  rsync/cm {rs / statistics.median(values):.2f}x"
        sender, receiver = (statistics.median(rss[tool][side]) / 1024 for side in ("sender", "receiver"))
        print(f"  {tool:8} {summary(values)}{ratio}   peak RSS (median MiB) sender {sender:5.0f}, receiver "
              f"{receiver:5.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
