"""Accounting benchmark: N finished jobs (default 1,000,000) in the real database, then cmacct's queries.

Inserts job documents with insert_many (ended spread over a year, 20 users, one in four a sync with
counters), makes the jobs collection's indexes, and times what cmacct and GET /v1/jobs?ended_after=...
ask of the store (cm.store.acct): a day of every user's jobs, a day of one user's, a week of one user's
failed ones, and the purge of the oldest day. Runs against MONGODB_URI when it is set (a mongod), else
the embedded FerretDB server (``make setup``), in a data directory of its own.

    .venv/bin/python bench/bench_acct.py [--jobs 1000000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cm import store  # noqa: E402
from cm.store import acct  # noqa: E402
from cm.store.documents import Job  # noqa: E402

DAY = 86400.0
STATES = ["COMPLETED"] * 8 + ["FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"]


def documents(start_id: int, count: int, now: float, rng: random.Random) -> list[dict]:
    docs = []
    for i in range(start_id, start_id + count):
        ended = now - rng.random() * 365 * DAY
        started = ended - rng.random() * 3600
        sync = i % 4 == 0
        user = f"user{i % 20}"
        docs.append({
            "_id": i, "name": "sync" if sync else f"job{i % 50}", "user": user, "uid": 2000 + i % 20, "gid": 2000,
            "kind": "sync" if sync else "command", "state": STATES[i % len(STATES)], "priority": 0,
            "partition": "gpu", "nodes": 1, "procs": 1, "cpus": 1, "mem_mb": 0, "time_limit": 86400.0, "cwd": "/",
            "argv": [] if sync else ["true"], "env": [], "stdout": "", "stderr": "", "requeue": False,
            "submitted": started - 1, "dispatched": started - 0.5, "started": started, "ended": ended,
            "exit_code": 0, "reason": "", "cancel_requested": False,
            "slots": [{"node": "gpu-1", "rank": 0, "role": "src" if sync else "run", "cpus": 1, "mem_mb": 0,
                       "started": True, "ended": True, "state": "COMPLETED", "exit_code": 0}]
                     + ([{"node": "cpu-1", "rank": 0, "role": "dst", "cpus": 1, "mem_mb": 0, "started": True,
                          "ended": True, "state": "COMPLETED", "exit_code": 0}] if sync else []),
            "sync": ({"src": {"partition": "gpu", "path": "/a"}, "dst": {"partition": "cpu", "path": "/b"}}
                     if sync else {}),
            "progress": {"bytes_done": 1 << 20, "bytes_total": 1 << 20, "files_done": 10, "files_total": 10,
                         "rate": 0.0} if sync else {},
            "runs": 1, "restarts": 0, "labels": {},
        })
    return docs


def timed(runs: int, call) -> tuple[float, int]:
    times, found = [], 0
    for _ in range(runs):
        t = time.perf_counter()
        found = len(call())
        times.append(time.perf_counter() - t)
    return statistics.median(times), found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--check-every", type=int, default=250_000, help="time the queries after this many more")
    args = parser.parse_args()
    server = None
    uri = os.environ.get("MONGODB_URI", "")
    work = tempfile.mkdtemp(prefix="cmacct")
    if not uri:
        from cm.cluster.db import DatabaseServer

        server = DatabaseServer()
        uri = server.start(Path(work) / "db", log_path=Path(work) / "db.log")
    try:
        store.connect(uri, f"bench_acct_{os.getpid()}", timeout=600)
        rng = random.Random(1)
        now = time.time()
        print(f"server: {'MONGODB_URI' if server is None else 'embedded FerretDB (SQLite)'}")
        print("indexes:", sorted(Job._get_collection().index_information()), flush=True)
        day = now - 100 * DAY
        cases = [
            ("a day, every user", lambda: acct.ended_jobs(day, day + DAY)),
            ("a day, one user", lambda: acct.ended_jobs(day, day + DAY, user="user3")),
            ("a week, one user, FAILED", lambda: acct.ended_jobs(day, day + 7 * DAY, user="user3", states=["FAILED"])),
        ]
        inserted, done = 0.0, 0
        while done < args.jobs:
            t = time.perf_counter()
            goal = min(args.jobs, done + args.check_every)
            for first in range(done + 1, goal + 1, args.batch):
                Job._get_collection().insert_many(documents(first, min(args.batch, goal + 1 - first), now, rng),
                                                  ordered=False)
            inserted += time.perf_counter() - t
            done = goal
            print(f"{done} jobs: insert_many in batches of {args.batch}: {inserted:.1f} s so far "
                  f"({done / inserted:,.0f} jobs/s)", flush=True)
            for what, call in cases:
                seconds, found = timed(args.runs, call)
                print(f"  query {what}: {found} jobs in {seconds * 1000:.0f} ms (median of {args.runs})", flush=True)
        t = time.perf_counter()
        gone = acct.purge(now - 364 * DAY)
        print(f"purge of the oldest day: {gone} jobs in {(time.perf_counter() - t) * 1000:.0f} ms")
        Job._get_db().client.drop_database(Job._get_db().name)
    finally:
        store.disconnect()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
