"""Benchmark: how long the commands take from Enter to the prompt, against a live local cluster.

    python bench/bench_commands.py [--runs 30]

Each command line runs ``--runs`` times, one after the other, as a user's shell runs it (the installed
entry point, a fresh interpreter each time); printed are the minimum, median and 90th percentile of the
wall clock, beside the interpreter's own start (`python -c pass`, the floor of any Python command) and
what importing click alone costs (`python -c 'import click'`, the floor of a command that loads it). The
target is 50 ms. cm's commands against Slurm's (`squeue`, `sbatch`) are in bench_slurm.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_sched import SETTLE, percentile, timed  # noqa: E402
from cm.cluster.local import LocalCluster, parse_partitions  # noqa: E402

BIN = Path(sys.executable).parent
TARGET_MS = 50.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    # compiled modules, as `make setup` leaves them (without, each start compiles what changed since: ~5 ms)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(__file__).resolve().parents[1] / "cm")],
                   stdout=subprocess.DEVNULL, check=True)
    root = Path(tempfile.mkdtemp(prefix="cmbenchcmd"))
    cluster = LocalCluster(root / "run", parse_partitions("gpu:2,cpu:2", 4), data_dir=root / "data",
                           db_dir=root / "db", env={"CM_DB_NAME": f"benchcmd{os.getpid()}", "CM_LOG_LEVEL": "WARNING"})
    print(f"{args.runs} runs of each command line, one after the other; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} before the runs")
    cluster.up()
    try:
        time.sleep(SETTLE)
        env = {**os.environ, "CM_RUN_DIR": str(cluster.run_dir)}
        cwd = str(root)
        (root / "data" / "gpu" / "one").mkdir(parents=True)
        (root / "data" / "gpu" / "one" / "file").write_bytes(b"x" * 4096)
        submit = lambda *argv: int(subprocess.run([str(BIN / argv[0]), "--parsable", *argv[1:]], env=env, cwd=cwd,  # noqa: E731
                                                  capture_output=True, text=True, check=True).stdout)
        done = submit("cmrun", "--wait", "true")
        held = [submit("cmrun", "--hold", "true") for _ in range(args.runs)]
        subprocess.run([str(BIN / "cmsync"), "--wait", "gpu:/one", "cpu:/one"], env=env, cwd=cwd, check=True,
                       capture_output=True)  # the first sync of the cluster: the rest are warm
        kills = iter(held)
        lines = [
            ("interpreter floor", [sys.executable, "-c", "pass"]),
            ("import click alone", [sys.executable, "-c", "import click"]),
            ("cminfo", [str(BIN / "cminfo")]),
            ("cminfo JOBID", [str(BIN / "cminfo"), str(done)]),
            ("cmrun true (submit)", [str(BIN / "cmrun"), "-o", "/dev/null", "-e", "/dev/null", "true"]),
            ("cmrun --wait true", [str(BIN / "cmrun"), "--wait", "-o", "/dev/null", "-e", "/dev/null", "true"]),
            ("cmsync --wait, 1 file, warm", [str(BIN / "cmsync"), "--wait", "gpu:/one", "cpu:/one"]),
            ("cmkill JOBID", None),
            ("cminfo --help (click)", [str(BIN / "cminfo"), "--help"]),
        ]
        print(f"{'command':32} {'min':>8} {'median':>8} {'p90':>8}   vs floor  (target {TARGET_MS:.0f} ms)")
        floor = None
        for name, argv in lines:
            if argv is None:  # a fresh held job for every run
                times = []
                for _ in range(args.runs):
                    times += timed([str(BIN / "cmkill"), str(next(kills))], 1, env, cwd)
            else:
                times = timed(argv, args.runs, env, cwd)
            median = percentile(times, 50)
            floor = floor or median
            verdict = "" if name.startswith(("interpreter", "import")) else \
                ("  under target" if median < TARGET_MS else "  OVER target")
            print(f"{name:32} {min(times):7.1f}  {median:7.1f}  {percentile(times, 90):7.1f}   "
                  f"{median / floor:5.2f}x{verdict}", flush=True)
    finally:
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
