"""The HTTP API beside the commands' socket: submit+status round trips and requests/s on the command socket,
on RUN_DIR/api.sock and on TCP with a token; and the head's CPU while it holds 1,000 idle long polls.

Targets (issue 11): the API adds < 2 ms p50 over the command path; 1,000 long polls cost < 5% of a core.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import psutil  # noqa: E402

from cm.api.client import Client as ApiClient  # noqa: E402
from cm.cli.client import Client  # noqa: E402
from cm.cluster.local import LocalCluster, parse_partitions  # noqa: E402
from cm.config import load  # noqa: E402
from bench_sched import percentile  # noqa: E402  (this directory is on sys.path when run as a script)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(submit, status, rounds: int, seconds: float) -> dict:
    """Round trips of submit (a held job: nothing runs) then status; then status alone for `seconds`."""
    trips = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        job_id = submit()
        status(job_id)
        trips.append((time.perf_counter() - t0) * 1000)
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        status(job_id)
        count += 1
    return {"p50_ms": percentile(trips, 50), "p99_ms": percentile(trips, 99), "status_per_s": count / seconds}


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def long_polls(cluster: LocalCluster, job_id: int, count: int, seconds: float) -> dict:
    """Head CPU (cores) over `seconds` idle, then with `count` long polls held open for as long."""
    head = psutil.Process(int(cluster.pidfile("headnode").read_text()))
    c0 = cpu_seconds(head)
    time.sleep(seconds)
    idle = (cpu_seconds(head) - c0) / seconds
    request = f"GET /v1/jobs/{job_id}?wait=60 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(cluster.run_dir / "api.sock"))
        s.sendall(request)
        socks.append(s)
    time.sleep(2.0)  # all of them taken in and parked
    c0 = cpu_seconds(head)
    time.sleep(seconds)
    held = (cpu_seconds(head) - c0) / seconds
    answered = 0
    for s in socks:
        s.settimeout(0)
        try:
            answered += bool(s.recv(1))
        except BlockingIOError:
            pass
        s.close()
    return {"polls": count, "idle_cores": idle, "with_polls_cores": held, "answered_early": answered}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--polls", type=int, default=1000)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="cmbench"))
    port = free_port()
    cluster = LocalCluster(root / "run", parse_partitions("cpu", 2), data_dir=root / "data", db_dir=root / "db",
                           env={"CM_DB_NAME": f"benchapi{os.getpid()}", "CM_LOG_LEVEL": "WARNING",
                                "CM_API_PORT": str(port), "CM_MAX_PENDING_PER_USER": "100000"})
    cluster.up()
    try:
        command = Client(load(env={"CM_RUN_DIR": str(cluster.run_dir)}))
        token = command.call("token")["token"]
        unix = ApiClient(str(cluster.run_dir / "api.sock"))
        tcp = ApiClient(f"https://127.0.0.1:{port}", token=token, cafile=str(cluster.run_dir / "api.crt"))
        body = {"argv": ["true"], "hold": True, "cwd": str(root)}
        paths = {
            "command socket": measure(
                lambda: command.submit(kind="command", **body)["job_id"],
                lambda i: command.call("info", job_id=i), args.rounds, args.seconds),
            "HTTP, api.sock": measure(lambda: unix.submit_command(**body), unix.status, args.rounds, args.seconds),
            "HTTPS, TCP + token": measure(lambda: tcp.submit_command(**body), tcp.status, args.rounds, args.seconds),
        }
        print(f"{'path':<20} {'submit+status p50':>18} {'p99':>9} {'status req/s':>13}")
        for name, r in paths.items():
            print(f"{name:<20} {r['p50_ms']:>15.2f} ms {r['p99_ms']:>6.2f} ms {r['status_per_s']:>13.0f}")
        base = paths["command socket"]["p50_ms"]
        for name in ("HTTP, api.sock", "HTTPS, TCP + token"):
            print(f"{name}: adds {paths[name]['p50_ms'] - base:+.2f} ms p50 over the command socket (target < 2 ms)")
        job_id = unix.submit_command(**body)  # held: every poll waits its whole 60 s
        polls = long_polls(cluster, job_id, args.polls, 10.0)
        print(f"head CPU: {polls['idle_cores']:.3f} cores idle, {polls['with_polls_cores']:.3f} cores holding "
              f"{polls['polls']} long polls (+{polls['with_polls_cores'] - polls['idle_cores']:.3f}; target < 0.05); "
              f"answered before their time: {polls['answered_early']}")
        return 0
    finally:
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
