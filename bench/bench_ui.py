"""The web page at scale: a real head and database, 1,000 simulated nodes (cm.cluster.simulator, as
bench_scale.py), 10,000 jobs (1,000 running, 9,000 queued behind them).

Prints how long the head takes to answer the cluster page (GET /ui/), the jobs page and one job's page over
RUN_DIR/api.sock (request sent to last byte read, logged in), and the head's CPU while a page follows a
running job through the long poll (GET /ui/jobs/ID.json?wait=1, as static/app.js does) against the same
head idle. Target (issue 25): the cluster page < 100 ms p50 at 1,000 nodes and 10,000 jobs.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_scale import head_cpu, wait_for  # noqa: E402  (this directory is on sys.path when run as a script)
from cm.cli.client import Client  # noqa: E402
from cm.cluster.local import LocalCluster  # noqa: E402
from cm.config import load  # noqa: E402


class Page:
    """A logged-in browser's requests, on api.sock, one keep-alive connection."""

    def __init__(self, socket_path: Path, token: str):
        self.path, self.cookies = str(socket_path), {}
        self.conn = self._connect()
        form = self.get("/ui/login")[1]
        login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', form)[1]
        status, _ = self.request("POST", "/ui/login", urlencode({"login_csrf": login_csrf, "token": token}))
        if status != 303 or "cm_session" not in self.cookies:
            raise SystemExit(f"cannot log in to the page: {status}")

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("localhost", timeout=300)
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(self.path)
        conn.sock = sock
        return conn

    def request(self, method: str, path: str, body: str | None = None) -> tuple[int, str]:
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        self.conn.request(method, path, body, headers)
        answer = self.conn.getresponse()
        text = answer.read().decode()
        cookie = answer.getheader("Set-Cookie")
        if cookie:
            name, _, value = cookie.split(";")[0].partition("=")
            self.cookies[name] = value
        return answer.status, text

    def get(self, path: str) -> tuple[int, str]:
        return self.request("GET", path)


def timed(page: Page, path: str, rounds: int, head: int) -> dict:
    """Wall time per request at the client, and the head process's CPU time per request (both threads)."""
    import psutil

    times = []
    proc = psutil.Process(head)
    before = sum(proc.cpu_times()[:2])
    for _ in range(rounds):
        t0 = time.perf_counter()
        status, text = page.get(path)
        times.append((time.perf_counter() - t0) * 1000)
        if status != 200:
            raise SystemExit(f"GET {path}: {status} {text[:300]}")
    cpu = (sum(proc.cpu_times()[:2]) - before) * 1000 / rounds
    times.sort()
    return {"p50": statistics.median(times), "p95": times[int(0.95 * (len(times) - 1))], "bytes": len(text),
            "cpu": cpu}


def in_process(nodes: int, jobs: int, rounds: int) -> None:
    """The pages' own cost, without daemons: the head's real request handlers (cm.head.requests) over a head
    holding `nodes` nodes and `jobs` jobs in memory, and the page's real rendering; what a request adds on
    its way (HTTP, the hop between the API's thread and the head's loop) is bench_api.py's ~2.6 ms."""
    import asyncio

    from cm.api.http import HttpRequest
    from cm.api.ui import Context, pages
    from cm.api.ui.sessions import Sessions
    from cm.callers import Caller
    from cm.head.requests import handle
    from cm.protocol import NodeView

    import msgspec

    rows = [NodeView(name=f"sim-{i}", partition="sim", state="ALLOCATED", cpus=4, cpus_free=0, mem_mb=16384,
                     mem_free_mb=8192) for i in range(nodes)]
    now = time.time()
    held = []
    for i in range(jobs):
        run = i < nodes
        held.append({"_id": i + 1, "name": f"job-{i}", "user": "root", "uid": 0, "gid": 0,
                     "kind": "sync" if run and i % 4 == 0 else "command", "state": "RUNNING" if run else "PENDING",
                     "slots": [{"node": f"sim-{i}", "role": "src"}] if run else [], "submitted": now - 100,
                     "started": now - 50 if run else None, "partition": "sim", "reason": "", "time_limit": 3600.0,
                     "priority": 0, "labels": {"batch": str(i % 10)}, "nodes": 1, "cwd": "/", "argv": ["true"],
                     "progress": {"bytes_done": 1 << 30, "bytes_total": 4 << 30, "rate": 1e8} if run else {},
                     "sync": {"src": {"partition": "sim", "path": "a"}, "dst": {"partition": "sim", "path": "b"}}})
    counts = {"RUNNING": nodes, "PENDING": jobs - nodes}

    class Head:  # what cm.head.requests asks of the head, from memory as the head answers it
        settings = None
        admin_policy: dict = {}

        def node_rows(self):
            return rows

        def listed(self, all_jobs):
            return held

        def why_waiting(self, job_id):
            return "Resources" if job_id > nodes else None

        def active(self, job_id):
            return None

        def find(self, job_id):
            return held[job_id - 1] if 0 < job_id <= len(held) else None

        def metrics(self):
            return {"jobs": counts}

    head, caller = Head(), Caller(0, 0, 0, "root", True)

    class Local(Context):
        async def ask(self, kind, args, watch=False):
            request = args if isinstance(args, kind) else msgspec.convert(args, kind)
            reply = handle(head, caller, request)
            if not reply.ok:
                raise SystemExit(f"{kind.TYPE}: {reply.error}")
            return reply.data

    sessions = Sessions()
    session = sessions.get(sessions.open("token", 0))
    for path, query in (("/ui/", {}), ("/ui/jobs", {"state": ["RUNNING"]}), ("/ui/jobs", {"label": ["batch=3"]}),
                        ("/ui/jobs/1", {})):
        times, cpu = [], []
        for _ in range(rounds):
            ctx = Local(None, HttpRequest("GET", path, query, {}), caller, session, None, True, None, {})
            t, c = time.perf_counter(), time.thread_time()
            answer = asyncio.run(pages.route(ctx))
            times.append((time.perf_counter() - t) * 1000)
            cpu.append((time.thread_time() - c) * 1000)
            if answer.status != 200:
                raise SystemExit(f"{path}: {answer.status} {answer.body[:300]!r}")
        times.sort()
        label = path + ("?" + "&".join(f"{k}={v[0]}" for k, v in query.items()) if query else "")
        print(f"in process, {nodes} nodes and {jobs} jobs: {label}: p50 {statistics.median(times):.1f} ms, "
              f"p95 {times[int(0.95 * (len(times) - 1))]:.1f} ms, CPU p50 {statistics.median(cpu):.1f} ms "
              f"({len(answer.body) / 1024:.0f} KiB)"
              + ("  (target < 100 ms)" if path == "/ui/" else ""))


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.stdout.reconfigure(line_buffering=True)  # each line as it is measured, also into a file
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--in-process", action="store_true",
                        help="only the pages' own cost (the head's handlers and the rendering), no daemons")
    args = parser.parse_args()
    in_process(args.nodes, args.jobs, args.rounds)
    if args.in_process:
        return 0
    root = Path(tempfile.mkdtemp(prefix="cmui"))
    cluster = LocalCluster(root / "run", [], data_dir=root / "data", db_dir=root / "db",
                           env={"CM_DB_NAME": f"ui{os.getpid()}", "CM_LOG_LEVEL": "WARNING",
                                "CM_MAX_PENDING_PER_USER": str(args.jobs + 10)})
    sim = None
    try:
        from cm.keys import ensure_keys

        t0 = time.monotonic()
        ensure_keys(cluster.run_dir, ["node"])  # before the head starts: a refused handshake is not retried
        cluster.up()
        client = Client(load(env={"CM_RUN_DIR": str(cluster.run_dir)}), timeout=300)
        sim = subprocess.Popen([sys.executable, "-m", "cm.cluster.simulator", "--nodes", str(args.nodes),
                                "--cpus", "4", "--run-dir", str(cluster.run_dir),
                                "--head", f"tcp://127.0.0.1:{cluster.head_port}"], cwd=str(root))
        wait_for(lambda: client.call("stats")["nodes_alive"] >= args.nodes, 600, f"{args.nodes} nodes")
        print(f"{args.nodes} nodes up after {time.monotonic() - t0:.0f} s")
        env = ["PATH=/usr/bin:/bin"]
        running = [client.call("submit", kind="command", argv=["sleep", "1d"], cwd="/", env=env, cpus=4,
                               partition="sim", name=f"filler-{i}")["job_id"] for i in range(args.nodes)]
        wait_for(lambda: client.call("stats")["pending"] == 0, 600, "fillers to start")
        print(f"{args.nodes} jobs running after {time.monotonic() - t0:.0f} s")
        for i in range(args.jobs - args.nodes):
            client.call("submit", kind="command", argv=["true"], cwd="/", env=env, partition="sim", cpus=1,
                        name=f"queued-{i}", labels={"batch": str(i % 10)})
        time.sleep(2)
        stats = client.call("stats")
        token = client.call("token")["token"]
        page = Page(cluster.run_dir / "api.sock", token)
        print(f"{stats['nodes_alive']} nodes, {args.nodes} jobs running and {stats['pending']} pending")
        head = cluster.procs["headnode"].pid
        for path in ("/ui/", "/ui/jobs?state=RUNNING", "/ui/jobs?label=batch%3D3", f"/ui/jobs/{running[0]}"):
            r = timed(page, path, args.rounds, head)
            print(f"GET {path}: p50 {r['p50']:.1f} ms, p95 {r['p95']:.1f} ms, head CPU {r['cpu']:.1f} ms a request "
                  f"({r['bytes'] / 1024:.0f} KiB)"
                  + ("  (target < 100 ms)" if path == "/ui/" else ""))

        idle = head_cpu(head, 10)
        stop = threading.Event()

        def follow() -> None:  # what static/app.js does on a running job's page
            poller = Page(cluster.run_dir / "api.sock", token)
            while not stop.is_set():
                poller.get(f"/ui/jobs/{running[0]}.json?wait=1")

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        time.sleep(2)
        live = head_cpu(head, 10)
        stop.set()
        thread.join(5)
        print(f"head CPU: {idle:.3f} cores idle, {live:.3f} with a page following a running job ({live - idle:+.3f})")
    finally:
        if sim is not None:
            sim.terminate()
            sim.wait()
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
