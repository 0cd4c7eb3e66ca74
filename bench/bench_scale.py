"""Scale benchmark: a real head and database, 1,000 simulated nodes, 10,000 queued jobs.

Prints the head's CPU use with every node heartbeating at the default
interval, the time of a scheduler pass over 10,000 pending jobs of mixed
shapes, the dispatch rate once nodes free up, and how long `cminfo` takes.
Targets (issue 4): < 0.5 core idle, pass < 1 s, cminfo < 1 s.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from cm.cli.client import Client  # noqa: E402
from cm.cluster.local import LocalCluster  # noqa: E402
from cm.config import load  # noqa: E402


def head_cpu(pid: int, seconds: float) -> float:
    proc = psutil.Process(pid)
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    return (after.user + after.system - before.user - before.system) / seconds


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.25)


def main() -> int:
    # stopped with SIGTERM (or Ctrl-C), the cluster and data it made are still cleaned up by `finally`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=10000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cmscale"))
    cluster = LocalCluster(root / "run", [], data_dir=root / "data", db_dir=root / "db",
                           env={"CM_DB_NAME": f"scale{os.getpid()}", "CM_LOG_LEVEL": "WARNING"})
    sim = None
    try:
        from cm.keys import ensure_keys

        ensure_keys(cluster.run_dir, ["node"])  # before the head starts: a refused handshake is not retried
        cluster.up()
        client = Client(load(env={"CM_RUN_DIR": str(cluster.run_dir)}), timeout=120)
        sim = subprocess.Popen([sys.executable, "-m", "cm.cluster.simulator", "--nodes", str(args.nodes),
                                "--cpus", "4", "--run-dir", str(cluster.run_dir),
                                "--head", f"tcp://127.0.0.1:{cluster.head_port}"], cwd=str(root))
        wait_for(lambda: client.call("stats")["nodes_alive"] >= args.nodes, 120, f"{args.nodes} nodes")
        head_pid = cluster.procs["headnode"].pid
        time.sleep(2)
        idle = head_cpu(head_pid, 10)
        print(f"{args.nodes} nodes heartbeating every 1 s: head uses {idle:.3f} cores (target < 0.5)")

        # fill every node, then queue jobs of mixed shapes behind them
        env = ["PATH=/usr/bin:/bin"]
        fillers = [client.submit(kind="command", argv=["sleep", "1d"], cwd="/", env=env, cpus=4,
                               partition="sim")["job_id"] for _ in range(args.nodes)]
        wait_for(lambda: client.call("stats")["pending"] == 0, 300, "fillers to start")
        rng = random.Random(1)
        t0 = time.perf_counter()
        for _ in range(args.jobs):
            client.submit(kind="command", argv=["true"], cwd="/", env=env, partition="sim",
                        nodes=rng.choice([1, 1, 1, 2, 4]), cpus=rng.choice([1, 2, 4]))
        submit_rate = args.jobs / (time.perf_counter() - t0)
        time.sleep(2)
        stats = client.call("stats")
        print(f"{args.jobs} jobs queued at {submit_rate:.0f} submits/s; a scheduler pass over {stats['pending']} "
              f"pending jobs took {stats['last_pass_ms']:.1f} ms (target < 1000 ms)")
        busy = head_cpu(head_pid, 5)
        print(f"head with {stats['pending']} pending jobs, nothing to do: {busy:.3f} cores")

        t = time.perf_counter()
        out = subprocess.run([str(Path(sys.executable).parent / "cminfo")], capture_output=True,
                             env={**os.environ, "CM_RUN_DIR": str(cluster.run_dir)})
        cminfo_s = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "cminfo"), "--json"], capture_output=True, check=True,
                       env={**os.environ, "CM_RUN_DIR": str(cluster.run_dir)})
        json_s = time.perf_counter() - t
        print(f"cminfo with {args.nodes} nodes and {args.jobs + args.nodes} jobs: {cminfo_s:.2f} s table, "
              f"{json_s:.2f} s --json (target < 1 s); exit {out.returncode}")

        t = time.perf_counter()
        client.call("cancel", job_ids=fillers)
        cancelled = time.perf_counter() - t
        before = client.call("stats")["pending"]
        last, changed = before, time.perf_counter()
        while time.perf_counter() - changed < 5:  # until the queue stops moving (the freed CPUs are full)
            time.sleep(0.5)
            pending = client.call("stats")["pending"]
            if pending != last:
                last, changed = pending, time.perf_counter()
        took = changed - t
        print(f"cancelling the {args.nodes} filler jobs took {cancelled:.1f} s; then {before - last} queued jobs were "
              f"dispatched in {took:.1f} s ({(before - last) / took:.0f} jobs/s), {last} still pending")
    finally:
        if sim is not None:
            sim.terminate()
            sim.wait()
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
