"""Scheduler benchmark: N trivial jobs (`true`) through a local cluster.

Prints the submit rate, end-to-end jobs/s (first submit to last end) and the
submit-to-start latency p50/p95 from the timestamps the head recorded. If
Slurm's sbatch and a live controller are present, runs the same load through
Slurm in the same run and prints the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cm.cli.client import Client  # noqa: E402
from cm.cluster.local import LocalCluster, parse_partitions  # noqa: E402
from cm.config import load  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


COMMAND_RUNS = 20  # times the queue is listed (cminfo, squeue) once the jobs ended


def timed(argv: list[str], runs: int, env: dict | None = None, cwd: str | None = None) -> list[float]:
    """Wall clock in ms of ``runs`` runs of a command, one after the other; a failing run ends the bench."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
        times.append((time.perf_counter() - t) * 1000)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    return times


SETTLE = 3.0  # seconds between the cluster's start and the timing: see run_cm


def run_cm(jobs: int, nodes: int, via_cmrun: bool = False) -> dict:
    """``jobs`` trivial jobs through a local cluster of ``nodes`` nodes: submitted through the API from this
    process, or with ``via_cmrun`` one `cmrun --parsable true` per job (as a user does, like sbatch).

    The timing starts SETTLE seconds after the nodes registered: each node's mover loads numba for about
    a second of CPU after that, which on 2 CPUs would be timed as the scheduler's (500 jobs: ~130 jobs/s
    unsettled against ~180 settled, the same code)."""
    root = Path(tempfile.mkdtemp(prefix="cmbench"))
    cluster = LocalCluster(root / "run", parse_partitions("cpu", nodes), data_dir=root / "data", db_dir=root / "db",
                           env={"CM_DB_NAME": f"bench{os.getpid()}", "CM_LOG_LEVEL": "WARNING"})
    cluster.up()
    try:
        time.sleep(SETTLE)
        client = Client(load(env={"CM_RUN_DIR": str(cluster.run_dir)}))
        env = [f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}"]
        cmrun = [str(Path(sys.executable).parent / "cmrun"), "--parsable", "-o", "/dev/null", "-e", "/dev/null", "true"]
        cli_env = {**os.environ, "CM_RUN_DIR": str(cluster.run_dir)}
        t0 = time.time()
        submit_ms = []
        if via_cmrun:
            ids = []
            for _ in range(jobs):
                t = time.perf_counter()
                ids.append(int(subprocess.run(cmrun, capture_output=True, text=True, check=True, cwd=str(root),
                                              env=cli_env).stdout.split()[0]))
                submit_ms.append((time.perf_counter() - t) * 1000)
        else:
            ids = [client.submit(kind="command", argv=["true"], cwd=str(root), env=env,
                               stdout="/dev/null", stderr="/dev/null")["job_id"] for _ in range(jobs)]
        t_submit = time.time() - t0
        wanted = set(ids)
        while True:  # poll one job at a time: listing every job would load the head we measure
            for job_id in ids:
                while client.call("info", job_id=job_id)["jobs"][0]["state"] not in ("COMPLETED", "FAILED"):
                    time.sleep(0.1)
            views = [j for j in client.call("info", all=True)["jobs"] if j["id"] in wanted]
            if len(views) == jobs and all(j["state"] in ("COMPLETED", "FAILED") for j in views):
                break
        failed = sum(1 for j in views if j["state"] != "COMPLETED")
        submitted = [j["times"]["submitted"] for j in views]
        latency = [(j["times"]["started"] - j["times"]["submitted"]) * 1000 for j in views]
        span = max(j["times"]["ended"] for j in views) - min(submitted)
        list_ms = timed([str(Path(sys.executable).parent / "cminfo")], COMMAND_RUNS, cli_env)
        return {"jobs": jobs, "failed": failed, "submit_rate": jobs / t_submit, "jobs_per_s": jobs / span,
                "p50_ms": percentile(latency, 50), "p95_ms": percentile(latency, 95),
                "latency_ms": latency, "submit_ms": submit_ms, "list_ms": list_ms}
    finally:
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)


def run_slurm(jobs: int) -> dict | None:
    if not shutil.which("sbatch") or subprocess.run(["scontrol", "ping"], capture_output=True).returncode != 0:
        return None
    t0 = time.time()
    ids = []
    for _ in range(jobs):
        out = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "true"], capture_output=True,
                             text=True, check=True).stdout
        ids.append(out.strip().split(";")[0])
    t_submit = time.time() - t0
    while subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True).stdout.strip():
        time.sleep(0.5)
    span = time.time() - t0
    return {"submit_rate": jobs / t_submit, "jobs_per_s": jobs / span}


def main() -> int:
    # stopped with SIGTERM (or Ctrl-C), the cluster and data it made are still cleaned up by `finally`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--nodes", type=int, default=4)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30} GiB, "
          f"Python {platform.python_version()}; local cluster of {args.nodes} nodes")
    cm = run_cm(args.jobs, args.nodes)
    print(f"cm    {cm['jobs']} jobs ({cm['failed']} failed): submit {cm['submit_rate']:.0f} jobs/s, "
          f"end-to-end {cm['jobs_per_s']:.1f} jobs/s, submit-to-start p50 {cm['p50_ms']:.1f} ms "
          f"p95 {cm['p95_ms']:.1f} ms; cminfo with them listed {percentile(cm['list_ms'], 50):.0f} ms (median)")
    slurm = run_slurm(args.jobs)
    if slurm:
        print(f"slurm {args.jobs} jobs: submit {slurm['submit_rate']:.0f} jobs/s, "
              f"end-to-end {slurm['jobs_per_s']:.1f} jobs/s")
        print(f"ratio cm/slurm end-to-end: {cm['jobs_per_s'] / slurm['jobs_per_s']:.1f}x")
    else:
        print("no Slurm controller running here: bench/bench_slurm.py starts one and runs the same jobs through both")
    return 0 if cm["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
