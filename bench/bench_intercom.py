"""Intercom benchmark: a real 2-node local cluster, one job of 2 nodes x 8 processes.

Prints put→get latency between processes on two nodes (p50/p99: from the start of
rank 0's put to the return of rank 8's blocking get, both on the machine's monotonic
clock), the time of one fence of all 16 processes (p50/p99 of back-to-back fences), and
commands per second from rank 0 to rank 8 (each send returns once the node of rank 8
queued it: process -> node -> head -> node and back).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_sched import percentile  # noqa: E402
from cm.cli.client import Client  # noqa: E402
from cm.cluster.local import LocalCluster, parse_partitions  # noqa: E402
from cm.config import load  # noqa: E402

JOB = """
    import json, os, sys, time
    from cm import intercom

    rounds, fences, commands = (int(a) for a in sys.argv[1:4])
    rank, per_node = int(os.environ["CM_PROC_RANK"]), int(os.environ["CM_PROCS_PER_NODE"])
    peer = per_node  # rank 0's partner: the first rank of the other node
    clock = time.monotonic
    out = {}
    intercom.fence(timeout=60)
    if rank == 0:
        for i in range(rounds):
            intercom.put(f"ping/{i}", repr(clock()))
            intercom.get(f"pong/{i}", timeout=30)
    elif rank == peer:
        lat = []
        for i in range(rounds):
            sent = float(intercom.get(f"ping/{i}", timeout=30))
            lat.append(clock() - sent)
            intercom.put(f"pong/{i}", "")
        out["put_get"] = lat
    intercom.fence(timeout=60)
    times = []
    for _ in range(fences):
        t = clock()
        intercom.fence(timeout=60)
        times.append(clock() - t)
    out["fence"] = times
    if rank == 0:
        t = clock()
        for i in range(commands):
            intercom.send(f"c{i}", to=f"rank=={peer}")
        out["send_s"] = clock() - t
    elif rank == peer:
        for _ in range(commands):
            intercom.recv(timeout=60)
    intercom.fence(timeout=60)
    json.dump(out, open(f"ic.{rank}.json", "w"))
"""


def run(procs: int, rounds: int, fences: int, commands: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="cmbench"))
    cluster = LocalCluster(root / "run", parse_partitions("cpu", 2), data_dir=root / "data", db_dir=root / "db",
                           env={"CM_DB_NAME": f"bench{os.getpid()}", "CM_LOG_LEVEL": "WARNING",
                                "CM_CPUS": str(procs)})
    cluster.up()
    try:
        client = Client(load(env={"CM_RUN_DIR": str(cluster.run_dir)}))
        script = root / "job.py"
        script.write_text(textwrap.dedent(JOB))
        job_id = client.submit(kind="command", nodes=2, procs=procs, partition="cpu",
                             argv=[sys.executable, str(script), str(rounds), str(fences), str(commands)],
                             cwd=str(root), env=[f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}"],
                             stdout="ic.%t.out", stderr="ic.%t.err")["job_id"]
        deadline = time.monotonic() + 600
        while (state := client.call("info", job_id=job_id)["jobs"][0]["state"]) not in (
                "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            if time.monotonic() > deadline:
                raise SystemExit("the benchmark job did not end in 600 s")
            time.sleep(0.2)
        if state != "COMPLETED":
            errors = "".join(p.read_text() for p in sorted(root.glob("ic.*.err")))
            raise SystemExit(f"the benchmark job ended {state}:\n{errors[-3000:]}")
        first = json.loads((root / "ic.0.json").read_text())
        peer = json.loads((root / f"ic.{procs}.json").read_text())
        lat = [x * 1000 for x in peer["put_get"]]
        fence = [x * 1000 for x in first["fence"]]
        return {"procs": 2 * procs, "put_get_p50_ms": percentile(lat, 50), "put_get_p99_ms": percentile(lat, 99),
                "fence_p50_ms": percentile(fence, 50), "fence_p99_ms": percentile(fence, 99),
                "commands_per_s": commands / first["send_s"]}
    finally:
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser()
    parser.add_argument("--procs", type=int, default=8, help="processes per node (2 nodes)")
    parser.add_argument("--rounds", type=int, default=300, help="put→get round trips")
    parser.add_argument("--fences", type=int, default=100)
    parser.add_argument("--commands", type=int, default=1000)
    args = parser.parse_args()
    r = run(args.procs, args.rounds, args.fences, args.commands)
    print(f"intercom, 2 nodes x {args.procs} processes (one machine)")
    print(f"  put→get between nodes: p50 {r['put_get_p50_ms']:.2f} ms, p99 {r['put_get_p99_ms']:.2f} ms "
          f"(target p50 < 2 ms)")
    print(f"  fence of {r['procs']}: p50 {r['fence_p50_ms']:.2f} ms, p99 {r['fence_p99_ms']:.2f} ms "
          f"(target < 10 ms)")
    print(f"  commands through the head: {r['commands_per_s']:.0f}/s")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
