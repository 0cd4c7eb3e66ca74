"""Benchmark: how soon the head answers a waiter, against a live local cluster (speed claims kept out of
`make test`, whose tests only check that a wait returns on the end and on time).

    python bench/bench_waits.py [--runs 10]

Printed, each over ``--runs``: how long after a job's recorded end a long poll (the `wait` request) returns
(target: under 0.25 s, not a poll interval later); how far past its timeout a wait on a job that goes on
returns (target: under 0.5 s past a 0.5 s timeout); how long cminfo takes with 20 clients each holding
half a request (target: under 1.5 s).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cm.cli.client import Client  # noqa: E402
from cm.cluster.local import LocalCluster, parse_partitions  # noqa: E402
from cm.config import load  # noqa: E402
from cm.protocol import Info, frame  # noqa: E402

BIN = Path(sys.executable).parent


def report(name: str, values: list[float], target: float) -> None:
    print(f"{name:55} median {statistics.median(values):6.3f} s  max {max(values):6.3f} s  "
          f"(target < {target} s){'' if max(values) < target else '  MISSED'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cmbenchwait"))
    cluster = LocalCluster(root / "run", parse_partitions("cpu:1", 1), data_dir=root / "data", db_dir=root / "db",
                           env={"CM_DB_NAME": f"benchwait{os.getpid()}", "CM_LOG_LEVEL": "WARNING",
                                "CM_CLIENT_TIMEOUT": "1"})
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    cluster.up()
    try:
        env = {**os.environ, "CM_RUN_DIR": str(cluster.run_dir)}
        client = Client(load(env={"CM_RUN_DIR": str(cluster.run_dir)}))
        submit = lambda *argv: int(subprocess.run([str(BIN / argv[0]), "--parsable", *argv[1:]], env=env,  # noqa: E731
                                                  cwd=str(root), capture_output=True, text=True, check=True).stdout)
        after_end, past_timeout, cminfo = [], [], []
        for _ in range(args.runs):
            job = submit("cmrun", "sleep", "0.5")
            view = client.call("wait", job_id=job, timeout=30)["jobs"][0]
            after_end.append(time.time() - view["times"]["ended"])
            job = submit("cmrun", "sleep", "30")
            started = time.monotonic()
            client.call("wait", job_id=job, timeout=0.5)
            past_timeout.append(time.monotonic() - started - 0.5)
            subprocess.run([str(BIN / "cmkill"), str(job)], env=env, capture_output=True)
            loris = []
            for _ in range(20):
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(cluster.run_dir / "head.sock"))
                body = frame(Info())
                s.sendall(body[: len(body) // 2])
                loris.append(s)
            started = time.monotonic()
            subprocess.run([str(BIN / "cminfo")], env=env, capture_output=True, check=True)
            cminfo.append(time.monotonic() - started)
            for s in loris:
                s.close()
        report("a long poll returns after the job's end", after_end, 0.25)
        report("a wait of 0.5 s on a running job returns past its timeout", past_timeout, 0.5)
        report("cminfo beside 20 clients holding half a request", cminfo, 1.5)
    finally:
        cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
