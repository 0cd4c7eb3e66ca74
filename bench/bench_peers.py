"""Benchmark: `cmsync --wait` as a user times it, beside rsync, fpsync, rclone, cp and one TCP stream.

    python bench/bench_peers.py [--quick] [--storage tmpfs,disk] [--reps 3] [--out FILE]

cm runs as a real local cluster (database, head, 2 nodes: partition ``src``
and partition ``dst``, its own database), started here and always stopped,
also on SIGTERM and Ctrl-C. Its time is the wall clock of
``cmsync --wait --parsable src:/X dst:/Y``, from the command's start to its
exit, after one warm-up sync; the job's own record (``cminfo --json``)
gives the breakdown printed beside it.

Every peer reads the same source (the ``src`` partition's directory) and
writes a fresh directory in the ``dst`` partition's directory:
  rsync   ``rsync -a`` to an rsync daemon on loopback (module = dst root)
  rsync-aHAXS  the same keeping what cm keeps by default: hard links, ACLs, xattrs, sparse files
  fpsync  fpart's parallel rsync jobs over partitions of the tree, to the same daemon:
          2 jobs, one partition each (on 20,000 files: -f 2,000 took 2.6 s, 5,000 1.5 s,
          one per job 1.2 s; 4 jobs no better)
  rclone  ``rclone sync`` local to local with parallel transfers and checkers
  cp      ``cp -r``: the local floor
  tcp     one file over one loopback TCP stream (bench/tcp_copy.py, sendfile):
          the network floor, scenario (a) only

Scenarios: (a) one 2 GiB file, (b) 20,000 files of 4-12 KiB in 100
directories, (c) a no-change re-sync of (b) (into each tool's own copy from
(b); cp and tcp have no such mode), (d) a mixed tree: 3 files of 256 MiB
among 10,000 small ones; and a 1-file tree synced by cm on a fresh cluster
(its first sync) and warm. Each storage (tmpfs under /dev/shm, and the disk)
gets its own cluster and data. Every scenario runs ``--reps`` times with the
tools in rotating order; the source is read before each run (warm cache)
and ``sync`` runs before each timing. On tmpfs each copy is deleted once
checked; on the disk nothing is deleted before the end (after mass
deletions, creating files on this VM's discard-mounted disk is slow for
minutes, which would penalise whoever runs next).

Output: per storage a table of median ms (and min-max) per tool, and cm's
ratio to each (peer_time / cm_time: > 1 means cm is faster); the JSON
results go to ``--out`` for bench/plot.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_sync import MiB, RsyncDaemon, make_big, make_small, warm  # noqa: E402
from cm.cluster.local import LocalCluster, parse_partitions  # noqa: E402

BENCH = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
TOOLS = ["cm", "rsync", "rsync-aHAXS", "fpsync", "rclone", "cp", "tcp"]
PACKAGES = {"rsync": "rsync", "fpsync": "fpart", "rclone": "rclone"}
SCENARIOS = {"a": "(a) one big file", "b": "(b) many small files", "c": "(c) no-change re-sync of (b)",
             "d": "(d) mixed tree"}
FPSYNC_JOBS, RCLONE_TRANSFERS, RCLONE_CHECKERS = 2, 4, 8


class Failed(RuntimeError):
    pass


def ensure_tools(install: bool) -> dict[str, str]:
    """Tool -> '' if usable, else why not; installs missing Debian packages first when ``install``."""
    missing = {t: p for t, p in PACKAGES.items() if shutil.which(t) is None}
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        pkgs = sorted(set(missing.values()))
        print(f"installing {' '.join(pkgs)} (apt-get install -y) ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *pkgs], stdout=subprocess.DEVNULL, check=False)
    why = {t: "" for t in TOOLS}
    for tool, pkg in PACKAGES.items():
        if shutil.which(tool) is None:
            why[tool] = f"not installed (Debian package {pkg})"
    if why["rsync"]:
        why["fpsync"] = why["fpsync"] or "needs rsync"
        why["rsync-aHAXS"] = "needs rsync"
    return why


def run(cmd: list[str], **kw) -> float:
    """Seconds ``cmd`` took; raises Failed with its output when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise Failed(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}")
    return elapsed


def tree_size(top: Path) -> tuple[int, int]:
    """(files, bytes) under ``top``."""
    files = size = 0
    for dirpath, _, names in os.walk(top):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(dirpath, name)).st_size
    return files, size


class Cm:
    """A local cluster of a head and two nodes (partitions src and dst) whose data is under ``data``."""

    def __init__(self, data: Path):
        self.root = Path(tempfile.mkdtemp(prefix="cmpeers"))  # short: Unix socket paths are limited
        os.chmod(self.root, 0o755)
        self.cluster = LocalCluster(self.root / "run", parse_partitions("src:1,dst:1", 2), data_dir=data,
                                    db_dir=self.root / "db",
                                    env={"CM_DB_NAME": f"benchpeers{os.getpid()}", "CM_LOG_LEVEL": "WARNING"})
        self.env = {**os.environ, "CM_RUN_DIR": str(self.root / "run")}
        self.env.pop("CM_CONFIG", None)

    def up(self) -> None:
        self.cluster.up(timeout=120)

    def command(self, src: str, dst: str) -> list[str]:
        return [str(BIN / "cmsync"), "--wait", "--parsable", f"src:/{src}", f"dst:/{dst}"]

    def sync(self, src: str, dst: str) -> tuple[float, dict]:
        """Wall seconds of ``cmsync --wait`` and the breakdown from the job's record."""
        t0 = time.time()
        proc = subprocess.run(self.command(src, dst), capture_output=True, text=True, env=self.env)
        t1 = time.time()
        if proc.returncode != 0:
            raise Failed(f"cmsync {src} -> {dst} exited {proc.returncode}: {proc.stderr[-800:]}\n"
                         + self.cluster.tail("headnode", 10))
        job_id = proc.stdout.split()[0]
        info = subprocess.run([str(BIN / "cminfo"), "--json", job_id], capture_output=True, text=True,
                              env=self.env, check=True)
        job = json.loads(info.stdout)["jobs"][0]
        times, stats = job["times"], job["transfer"]["stats"]
        run_s = times["ended"] - times["started"]
        breakdown = {
            "command_to_submitted": times["submitted"] - t0,  # interpreter, imports, connect, submit
            "submitted_to_started": times["started"] - times["submitted"],  # scheduling, dispatch
            "sender": stats["elapsed"],  # the sender's run: connect, walk both sides, decide, data, Bye
            "run_other": run_s - stats["elapsed"],  # hand-off to a sender, receiver's publish, the report
            "ended_to_prompt": t1 - times["ended"],  # the waiting client noticing the end, and exiting
            "bytes_sent": stats["bytes_sent"], "files_sent": stats["files_sent"],
        }
        return t1 - t0, breakdown

    def down(self) -> None:
        self.cluster.down()
        shutil.rmtree(self.root, ignore_errors=True)


class Peers:
    """The peers' command lines and their runs into ``dst_root``."""

    def __init__(self, src_root: Path, dst_root: Path, work: Path, why: dict[str, str]):
        self.src_root, self.dst_root, self.work = src_root, dst_root, work
        self.daemon = None if why["rsync"] else RsyncDaemon(dst_root, work)

    def command(self, tool: str, src: str, dst: str) -> list[str]:
        s, d = self.src_root / src, self.dst_root / dst
        if tool == "rsync":
            return ["rsync", "-a", f"{s}/", f"{self.daemon.url}/{dst}/"]
        if tool == "rsync-aHAXS":
            return ["rsync", "-aHAXS", f"{s}/", f"{self.daemon.url}/{dst}/"]
        if tool == "fpsync":  # one partition per job: each partition costs fpsync a pass of its job loop
            per_job = -(-self.entries(src) // FPSYNC_JOBS)
            return ["fpsync", "-n", str(FPSYNC_JOBS), "-f", str(per_job), "-t", str(self.work / "fpsync"),
                    "-o", "-lptgoD --numeric-ids", f"{s}/", f"{self.daemon.url}/{dst}/"]
        if tool == "rclone":
            return ["rclone", "sync", "--config", "/dev/null", "--transfers", str(RCLONE_TRANSFERS),
                    "--checkers", str(RCLONE_CHECKERS), str(s), str(d)]
        if tool == "cp":
            return ["cp", "-r", str(s), str(d)]
        raise ValueError(tool)

    @functools.cache
    def entries(self, src: str) -> int:
        """Files and directories under the source ``src`` (what fpart counts)."""
        return sum(len(dirs) + len(files) for _, dirs, files in os.walk(self.src_root / src))

    def sync(self, tool: str, src: str, dst: str) -> float:
        if tool == "tcp":
            return self.tcp(src, dst)
        if tool == "fpsync":  # fpsync gets the content of src/ into an existing dst/
            run(["rsync", "-d", f"{self.work}/empty/", f"{self.daemon.url}/{dst}/"])
        return run(self.command(tool, src, dst))

    def tcp_command(self, src: str, dst: str) -> str:
        f = next(p.name for p in (self.src_root / src).iterdir())
        return (f"python bench/tcp_copy.py recv {self.dst_root / dst / f} & "
                f"python bench/tcp_copy.py send PORT {self.src_root / src / f}")

    def tcp(self, src: str, dst: str) -> float:
        (self.dst_root / dst).mkdir()
        name = next(p.name for p in (self.src_root / src).iterdir())
        recv = subprocess.Popen([sys.executable, str(BENCH / "tcp_copy.py"), "recv", str(self.dst_root / dst / name)],
                                stdout=subprocess.PIPE, text=True)
        try:
            port = recv.stdout.readline().strip()
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(BENCH / "tcp_copy.py"), "send", port, str(self.src_root / src / name)],
                           check=True)
            recv.wait(timeout=600)
            return time.perf_counter() - t0
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.close()


def applies(tool: str, scen: str) -> bool:
    return not ((tool == "tcp" and scen != "a") or (tool == "cp" and scen == "c"))


def bench_storage(label: str, base: Path, args, why: dict[str, str], sizes: dict) -> dict:
    """All scenarios on one storage; returns {times, breakdown, first_sync, commands}."""
    data, work = base / "data", base / "work"
    src_root, dst_root = data / "src", data / "dst"
    for d in (src_root, dst_root, work / "empty"):
        d.mkdir(parents=True)
    print(f"\n== {label}: {base} ({sizes['label']}) making data ...", flush=True)
    make_big(src_root / "a" / "big.bin", sizes["big"])
    make_small(src_root / "b", sizes["small"])
    make_small(src_root / "d", sizes["mixed_small"])
    for i in range(sizes["mixed_big_n"]):
        make_big(src_root / "d" / f"dir{i:03d}" / f"big{i}.bin", sizes["mixed_big"])
    make_small(src_root / "one", 1, ndirs=1)
    expect = {s: tree_size(src_root / s) for s in ("a", "b", "d")}
    tools = [t for t in TOOLS if not why[t]]
    result = {"times": {s: {t: [] for t in tools if applies(t, s)} for s in "abcd"},
              "breakdown": {s: [] for s in "abcd"}, "first_sync": {}, "commands": {}}
    cm = Cm(data)
    peers = None
    try:
        cm.up()
        peers = Peers(src_root, dst_root, work, why)
        t, bd = cm.sync("one", "one-first")  # the cluster's first sync
        result["first_sync"] = {"first_ms": t * 1000, "first_breakdown": bd}
        warm_ms = [cm.sync("one", f"one-warm{i}")[0] * 1000 for i in range(args.reps)]
        result["first_sync"]["warm_ms"] = warm_ms
        for scen in "a", "b", "d":
            result["commands"][scen] = {t: " ".join(cm.command(scen, f"{t}-{scen}-R")) if t == "cm" else
                                        peers.tcp_command(scen, f"{t}-{scen}-R") if t == "tcp" else
                                        " ".join(peers.command(t, scen, f"{t}-{scen}-R"))
                                        for t in result["times"][scen]}
        for scen in [s for s in "bcda" if s in args.scenarios]:  # (a), the largest, last: on disk nothing
            # written before it is deleted
            for rep in range(args.reps):
                names = list(result["times"][scen])
                order = names[rep % len(names):] + names[:rep % len(names)]
                for tool in order:
                    src = "b" if scen == "c" else scen
                    dst = f"{tool}-b-0" if scen == "c" else f"{tool}-{scen}-{rep}"
                    warm(src_root / src)
                    os.sync()
                    if tool == "cm":
                        t, bd = cm.sync(src, dst)
                        result["breakdown"][scen].append(bd)
                        if scen == "c" and bd["bytes_sent"]:
                            raise Failed(f"cm's no-change re-sync sent {bd['bytes_sent']} bytes")
                    else:
                        t = peers.sync(tool, src, dst)
                    result["times"][scen][tool].append(t * 1000)
                    got = tree_size(dst_root / dst)
                    if got != expect[src]:
                        raise Failed(f"{tool} copied {got} (files, bytes) of {expect[src]} in {scen}")
                    if label == "tmpfs" and (scen in "ad" or scen == "b" and rep > 0):
                        shutil.rmtree(dst_root / dst)  # memory; tmpfs has no discard penalty; (c) needs b-0
                    print(f"  {scen} run {rep + 1}: {tool:7} {t * 1000:9.0f} ms", flush=True)
    finally:
        if peers is not None:
            peers.close()
        cm.down()
    return result


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.0f} ({min(values):.0f}-{max(values):.0f})"


def print_storage(label: str, res: dict, why: dict[str, str]) -> None:
    ran = [scen for scen in "abcd" if res["times"][scen].get("cm")]
    print(f"\n{label}: median ms (min-max) of {len(res['times'][ran[0]]['cm']) if ran else 0} runs; "
          f"cm/peer = peer_time / cm_time (> 1: cm faster)")
    head = f"{'scenario':30}" + "".join(f"{t:>22}" for t in TOOLS)
    print(head)
    print("-" * len(head))
    for scen in ran:
        times = res["times"][scen]
        row = f"{SCENARIOS[scen]:30}"
        for tool in TOOLS:
            row += f"{summary(times[tool]) if tool in times else ('missing' if why[tool] else 'n/a'):>22}"
        print(row)
        cm = statistics.median(times["cm"])
        ratios = [f"{t} {statistics.median(times[t]) / cm:.2f}x" for t in TOOLS[1:] if t in times]
        print(f"{'   cm vs':30} " + ", ".join(ratios))
    print("\ncm's breakdown (median ms): command start->submitted | submitted->started | sender (walk+decide+data) "
          "| rest of the run (hand-off, publish, report) | ended->prompt")
    for scen in ran:
        bds = res["breakdown"][scen]
        keys = ["command_to_submitted", "submitted_to_started", "sender", "run_other", "ended_to_prompt"]
        print(f"  {SCENARIOS[scen]:30}" + " | ".join(f"{statistics.median(b[k] for b in bds) * 1000:7.0f}"
                                                      for k in keys))
    print("  not in the job's record: the walk, the data and the receiver's publish separately (the sender reports "
          "one elapsed for all of its run), the dispatch to the node apart from scheduling")
    fs = res["first_sync"]
    print(f"\n1-file tree at the prompt: first sync on a fresh cluster {fs['first_ms']:.0f} ms, "
          f"warm {summary(fs['warm_ms'])} ms")


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `finally` still stops the cluster and deletes
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small data (256 MiB, 2,000 files), 1 run: a short check")
    ap.add_argument("--storage", default="tmpfs,disk", help="tmpfs, disk or both (comma-separated)")
    ap.add_argument("--tmpfs-dir", default="/dev/shm/cm-bench-peers")
    ap.add_argument("--disk-dir", default="/var/tmp/cm-bench-peers")
    ap.add_argument("--scenarios", default="abcd", help="which of a, b, c (needs b's copies), d to run")
    ap.add_argument("--reps", type=int, help="runs per tool and scenario (default 3; 1 with --quick)")
    ap.add_argument("--out", help="JSON results (default docs/benchmarks.json; a temporary file with --quick)")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install missing peers")
    args = ap.parse_args()
    args.reps = args.reps or (1 if args.quick else 3)
    out = Path(args.out or (Path(tempfile.gettempdir()) / "cm-bench-peers-quick.json" if args.quick
                            else BENCH.parent / "docs" / "benchmarks.json"))
    if args.quick:
        sizes = {"big": 256 * MiB, "small": 2000, "mixed_small": 1000, "mixed_big": 64 * MiB, "mixed_big_n": 2}
    else:
        sizes = {"big": 2048 * MiB, "small": 20000, "mixed_small": 10000, "mixed_big": 256 * MiB, "mixed_big_n": 3}
    sizes["label"] = (f"(a) {sizes['big'] // MiB} MiB, (b) {sizes['small']} files, (d) {sizes['mixed_big_n']} x "
                      f"{sizes['mixed_big'] // MiB} MiB + {sizes['mixed_small']} files")
    why = ensure_tools(not args.no_install)
    for tool, reason in why.items():
        if reason:
            print(f"peer {tool}: MISSING, {reason}")
    uname = platform.uname()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 30
    print(f"machine: {os.cpu_count()} CPUs, {mem} GiB, Linux {uname.release}, Python {platform.python_version()}; "
          f"{args.reps} runs per tool; load average {os.getloadavg()[0]:.2f} before the runs (the cluster and peers "
          f"share these CPUs with whatever else runs)")
    results = {"date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count(), "mem_gib": mem,
               "kernel": uname.release, "load_before": round(os.getloadavg()[0], 2)}, "sizes": sizes, "reps": args.reps, "missing": {t: w for t, w in why.items() if w},
               "storage": {}}
    # a copy per tool and run stays on the disk until the end; tmpfs keeps about two of each at once
    mixed = sizes["mixed_big"] * sizes["mixed_big_n"]
    need = {"tmpfs": (sizes["big"] + mixed) * 3,
            "disk": sizes["big"] * (len(TOOLS) * args.reps + 1) + mixed * ((len(TOOLS) - 1) * args.reps + 1)}
    for label in args.storage.split(","):
        base = Path(args.tmpfs_dir if label == "tmpfs" else args.disk_dir)
        free = shutil.disk_usage(base.parent).free
        if free < need[label] * 1.1:
            print(f"\n== {label}: SKIPPED, {free >> 30} GiB free on {base.parent}, needs {need[label] * 1.1 / 2**30:.0f}")
            continue
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        try:
            res = bench_storage(label, base, args, why, sizes)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        results["storage"][label] = res
        print_storage(label, res, why)
        print("\nexact commands (R = the run):")
        for scen, cmds in res["commands"].items():
            for tool, cmd in cmds.items():
                print(f"  ({scen}) {tool:7} {cmd}")
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
