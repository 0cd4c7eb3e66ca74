"""Benchmark: cm's mover against rsync (daemon on loopback) and cp, side by side.

    python bench/bench_sync.py [--quick] [--dir DIR] [--cold]

Scenarios, same data for every tool:
  (a) one large file (2 GiB; 256 MiB with --quick)
  (b) 20,000 files of 4-12 KiB in 100 directories (4,000 with --quick)
  (c) re-sync of (b) with nothing changed

cm = the node's mover process (cm.node.mover, as a node daemon runs it) + one
sender (1 rank), both acting as ``--user`` (default nobody) as a user's sync
does, the sender started ahead and warmed up the way a node keeps its
senders warm (a zygote they fork from, CM_WARM_SENDER);
its time runs from handing it the job to its exit. (b) is also run with a
sender started cold, as on a node's first sync, and printed below the table.
Every tool gets a fresh, empty destination and a warm source page cache
(the source is read once before each run), and ``sync`` runs before each
timing so no tool pays for another's writeback. Nothing is deleted until
the end: on this class of VM, creating files right after deleting many is
several times slower, which would penalise whoever runs next. Each tool
runs ``--reps`` times per scenario, in rotating order, and keeps its best. With ``--cold`` the page
cache is dropped before each run instead (needs root and a writable
/proc/sys/vm/drop_caches). Times are wall-clock for the client command,
including process start-up. Peak RSS is the kernel's high-water mark.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---- data ----

def make_big(path: Path, size: int) -> None:
    """A file of ``size`` incompressible bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(64 * MiB)
    with open(path, "wb") as f:
        left = size
        i = 0
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            block = block[4096:] + block[:4096]  # differ block to block
            left -= n
            i += 1


def make_small(top: Path, nfiles: int, ndirs: int = 100) -> int:
    """``nfiles`` files of 4-12 KiB spread over ``ndirs`` directories; returns total bytes."""
    rnd = os.urandom(12 * 1024 + nfiles)
    total = 0
    for d in range(ndirs):
        (top / f"dir{d:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(nfiles):
        size = 4096 + (i * 7919) % (8 * 1024 + 1)
        (top / f"dir{i % ndirs:03d}" / f"file{i:06d}.dat").write_bytes(rnd[i % 1024:i % 1024 + size])
        total += size
    return total


def warm(top: Path) -> None:
    """Read every file under ``top`` so that all tools start from a warm cache."""
    for dirpath, _, files in os.walk(top):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(8 * MiB):
                    pass


def settle(cold: bool) -> None:
    os.sync()
    if cold:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def fresh(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def timed(cmd: list[str], **kw) -> tuple[float, int]:
    """Run ``cmd``; returns (seconds, peak RSS in KiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, **kw)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed with {proc.returncode}")
    return elapsed, usage.ru_maxrss


# ---- tools ----

class Cm:
    """The node's mover process (as a node daemon runs it) and a sender process per run, both as ``user``."""

    def __init__(self, root: Path, user):
        from cm.creds import Identity
        from cm.node.mover import Mover

        self.root = root
        self.who = Identity.of_user(user.pw_uid, user.pw_gid)
        self.mover = Mover("127.0.0.1", 0, chunk_size=64 * MiB, log_level="WARNING")
        self.mover.start()
        self.port = self.mover.port

    def sync(self, src: Path, dst_rel: str, streams: int, spare: bool = True) -> tuple[float, int, dict]:
        """One sender run into ``dst_rel``; returns (seconds, sender peak RSS KiB, final report).

        With ``spare`` the sender is started and warmed up first, untimed.
        """
        tid, token = secrets.token_hex(4), secrets.token_hex(8)
        self.register(tid, token, dst_rel)
        spec = {"transfer_id": tid, "token": token, "src_root": str(src), "src_path": "/",
                "dst_host": "127.0.0.1", "dst_port": self.port, "streams": streams, "chunk_size": 64 * MiB}
        job = {"transfer": spec, "uid": self.who.uid, "gid": self.who.gid, "groups": list(self.who.groups),
               "stderr": None}
        out_path = self.root.parent / "cm-send.out"
        cmd = [sys.executable, "-m", "cm.transfer.send", "--spare"]
        with open(out_path, "w") as out:
            if spare:
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, env=_env(), text=True)
                _wait_idle(proc.pid)
            t0 = time.perf_counter()
            if not spare:
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, env=_env(), text=True)
            proc.stdin.write(json.dumps(job))
            proc.stdin.close()
            _, status, usage = os.wait4(proc.pid, 0)
            elapsed = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError("cm sender failed")
        report = json.loads(out_path.read_text().splitlines()[-1])
        return elapsed, usage.ru_maxrss, report

    def register(self, tid: str, token: str, dst_rel: str) -> None:
        self.mover.register(tid, token, self.root, dst_rel, self.who)

    def peak_rss(self) -> int:
        with open(f"/proc/{self.mover.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def close(self) -> None:
        self.mover.stop()


def _wait_idle(pid: int) -> None:
    """Wait until a spare sender has loaded everything and sleeps on its stdin."""
    last, still = -1, 0
    while still < 4:
        time.sleep(0.05)
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        if fields[0] in "ZX":
            raise RuntimeError("the spare sender exited before its job")
        cpu = int(fields[11]) + int(fields[12])
        still = still + 1 if fields[0] == "S" and cpu == last else 0
        last = cpu


class RsyncDaemon:
    def __init__(self, root: Path, work: Path):
        self.root = root
        port = _free_port()
        conf = work / "rsyncd.conf"
        conf.write_text(f"use chroot = false\nuid = root\ngid = root\nmax connections = 4\n"
                        f"[bench]\npath = {root}\nread only = false\n")
        self.url = f"rsync://127.0.0.1:{port}/bench"
        self.proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={port}",
                                      f"--log-file={work / 'rsyncd.log'}"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("rsync daemon did not start")

    def sync(self, src: Path, dst_rel: str) -> tuple[float, int]:
        return timed(["rsync", "-a", f"{src}/", f"{self.url}/{dst_rel}/"])

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the run ----

def main() -> None:
    # stopped with SIGTERM (or Ctrl-C), the cluster and data it made are still cleaned up by `finally`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller data (256 MiB, 4,000 files)")
    ap.add_argument("--dir", default="/tmp/cm-bench", help="scratch directory (wiped)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2, help="runs per tool and scenario; the best is kept")
    ap.add_argument("--user", default="nobody",
                    help="cm syncs as this user, as a user's job does (root: as root, keeping owners)")
    args = ap.parse_args()
    import pwd

    user = pwd.getpwnam(args.user)
    if os.geteuid() != 0 and user.pw_uid != os.geteuid():
        ap.error(f"only root can sync as {args.user}: add --user {pwd.getpwuid(os.geteuid()).pw_name}")
    big_size = (256 if args.quick else 2048) * MiB
    nfiles = 4000 if args.quick else 20000
    work = Path(args.dir)
    fresh(work)
    work.chmod(0o755)  # the user reads the sources and writes the destination
    src_a, src_b, dst = work / "src-a", work / "src-b", work / "dst"
    print(f"making data in {work} ...", flush=True)
    make_big(src_a / "big.bin", big_size)
    small_bytes = make_small(src_b, nfiles)
    fresh(dst)
    os.chown(dst, user.pw_uid, user.pw_gid)
    have_rsync = shutil.which("rsync") is not None
    if not have_rsync:
        print("rsync is not installed (apt-get install -y rsync): skipping the rsync baseline")

    tools = ["cm", "rsync", "cp"] if have_rsync else ["cm", "cp"]
    cold_cm = {"a": [], "b": ["cm-cold"]}  # extra tools per scenario
    best: dict[str, dict[str, float]] = {"a": {}, "b": {}, "c": {}}
    rss: dict[str, list[int]] = {"sender": [], "receiver": []}
    cm = Cm(dst, user)
    daemon = RsyncDaemon(dst, work) if have_rsync else None
    try:
        for scen, src in (("a", src_a), ("b", src_b)):
            for rep in range(args.reps):
                everyone = tools + cold_cm[scen]
                order = everyone[rep % len(everyone):] + everyone[:rep % len(everyone)]  # rotate who goes first
                for tool in order:
                    target = f"{tool}-{scen}-{rep}"
                    if args.cold:
                        settle(True)
                    else:
                        warm(src)
                        settle(False)
                    if tool in ("cm", "cm-cold"):
                        t, sender_rss, _ = cm.sync(src, "/" + target, args.streams, spare=tool == "cm")
                        rss["sender"].append(sender_rss)
                        _check_same(src, dst / target)
                    elif tool == "rsync":
                        t, _ = daemon.sync(src, target)
                    else:
                        t, _ = timed(["cp", "-r", str(src), str(dst / target)])
                    _keep_best(best, scen, tool, t)
                    if scen == "b" and tool in ("cm", "rsync"):  # (c): the same sync again, nothing changed
                        settle(args.cold)
                        if tool == "cm":
                            t, sender_rss, report = cm.sync(src, "/" + target, args.streams)
                            rss["sender"].append(sender_rss)
                            if report["bytes_sent"] != 0:
                                raise RuntimeError(f"the no-change run sent data: {report}")
                        else:
                            t, _ = daemon.sync(src, target)
                        _keep_best(best, "c", tool, t)
        rss["receiver"].append(cm.peak_rss())
    finally:
        cm.close()
        if daemon is not None:
            daemon.close()
    print_report(best, rss, big_size, nfiles, small_bytes, args)
    shutil.rmtree(work)


def _keep_best(best: dict, scen: str, tool: str, t: float) -> None:
    best[scen][tool] = min(t, best[scen].get(tool, t))


def _check_same(src: Path, dst: Path) -> None:
    out = subprocess.run(["diff", "-rq", "--no-dereference", str(src), str(dst)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cm copy differs from the source: {out.stdout[:500]}")


def print_report(results, rss, big_size, nfiles, small_bytes, args) -> None:
    def rate(scen: str, tool: str) -> str:
        t = results[scen].get(tool)
        if t is None:
            return "n/a"
        if scen == "a":
            return f"{big_size / t / 1e6:8.0f} MB/s"
        return f"{nfiles / t:8.0f} files/s"

    def ratio(scen: str, tool: str) -> str:
        a, b = results[scen].get("cm"), results[scen].get(tool)
        return "n/a" if a is None or b is None else f"{b / a:5.2f}x"

    names = {"a": f"(a) 1 file, {big_size // MiB} MiB", "b": f"(b) {nfiles} files, {small_bytes // MiB} MiB",
             "c": "(c) re-sync of (b), no change"}
    print()
    print(f"mode: {'quick' if args.quick else 'full'}, {'cold' if args.cold else 'warm'} source cache, "
          f"{args.streams} streams, {os.cpu_count()} CPUs, cm as {args.user}")
    head = f"{'scenario':34} {'cm':>16} {'rsync daemon':>16} {'cp -r':>16} {'cm/rsync':>9} {'cm/cp':>7}"
    print(head)
    print("-" * len(head))
    for scen in "abc":
        times = "  ".join(f"{results[scen].get(t, 0) or 0:6.2f}s" for t in ("cm", "rsync", "cp"))
        print(f"{names[scen]:34} {rate(scen, 'cm'):>16} {rate(scen, 'rsync'):>16} {rate(scen, 'cp'):>16} "
              f"{ratio(scen, 'rsync'):>9} {ratio(scen, 'cp'):>7}   [{times}]")
    cold = results["b"].get("cm-cold")
    if cold:
        rs = results["b"].get("rsync")
        print(f"(b) with the sender started cold (a node's first sync): {nfiles / cold:.0f} files/s, {cold:.2f}s"
              + (f", {rs / cold:.2f}x rsync" if rs else ""))
    print()
    print(f"peak RSS: cm sender {max(rss['sender']) / 1024:.0f} MiB (largest of all runs), "
          f"cm receiver {max(rss['receiver'] or [0]) / 1024:.0f} MiB (whole benchmark)")


if __name__ == "__main__":
    main()
