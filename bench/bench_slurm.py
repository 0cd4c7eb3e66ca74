"""Benchmark: the same trivial jobs (`true`) through a one-node Slurm and through cm, in one run.

    python bench/bench_slurm.py [--jobs 500] [--nodes 4] [--no-install]

Slurm is Debian's slurm-wlm with munge (apt-get installed when missing, as
root), started here from a private directory (its own munge key and socket,
slurm.conf, state, logs, free ports; nothing under /etc is changed) and tuned
for throughput: SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,
MinJobAge=2, no accounting, no job accounting gatherer, one node configured
with ``--slurm-cpus`` CPUs (default 128: slurmctld starts pending jobs about
once a second, so with as few CPUs as cm's cluster has slots it would run at
most that many jobs a second; with 128 every pending job starts at the next
pass). Both get the jobs one command per job (`sbatch --wrap true`,
`cmrun true`), submitted one after the other; cm is also fed through its API
from this process, for the scheduler alone. jobs/s is end to end: first
submit to the last job's end. Submit-to-start: cm's from the head's record;
Slurm's from the client's clock at submit to slurmctld's "Allocate" log line
(millisecond timestamps). The commands themselves are compared too: the median
wall clock of a submit (`sbatch --wrap true`, `cmrun true`) and of listing the
queue once the jobs ended (`squeue`, `cminfo`). slurmctld, slurmd and munged are stopped at the
end, also on errors, SIGTERM and Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_sched import COMMAND_RUNS, percentile, run_cm, timed  # noqa: E402
from cm.cluster.db import free_port  # noqa: E402

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["munged", "slurmctld", "slurmd"]


def ensure_slurm(install: bool) -> str:
    """'' when Slurm and munge are here (installing them if allowed), else why not."""
    have = lambda: all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS + ["sbatch"])  # noqa: E731
    if not have() and install and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(PACKAGES)} (apt-get install -y) ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], stdout=subprocess.DEVNULL, check=False)
    if not have():
        return f"not installed (Debian packages {' '.join(PACKAGES)})"
    if os.geteuid() != 0:
        return "slurmd must run as root"
    return ""


class Slurm:
    """A one-node Slurm (munged, slurmctld, slurmd) living in ``root``."""

    def __init__(self, root: Path, cpus: int):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool"):
            (r / d).mkdir(mode=0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = r / "munge" / "munge.sock"
        self.spawn("munged", ["munged", "-F", "-f", f"--socket={sock}", f"--key-file={key}",
                              f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'munged.log'}",
                              f"--seed-file={r / 'munge' / 'seed'}"])
        self.wait_for(lambda: sock.exists(), "munged's socket")
        self.conf.write_text(f"""ClusterName=cmbench
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=error
LogTimeFormat=iso8601_ms
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MinJobAge=2
MaxJobCount=100000
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=bench Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        self.spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self.spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.host])
        self.wait_for(self.idle, "the Slurm node to be idle", timeout=60)

    def spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env, start_new_session=True)
        log.close()

    def wait_for(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: "
                                       + (self.root / f"{name}.out").read_text(errors="replace")[-1500:]
                                       + self.tail(name))
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited {timeout:.0f} s for {what}:\n{self.tail('slurmctld')}{self.tail('slurmd')}")
            time.sleep(0.2)

    def tail(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-1500:] if path.exists() else ""

    def idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env).stdout
        return out.strip() == "idle"

    def run(self, jobs: int) -> dict:
        """``jobs`` times `sbatch --wrap true`, one after the other; until all ended."""
        submit_at: dict[str, float] = {}
        submit_ms = []
        t0 = time.time()
        for _ in range(jobs):
            t = time.time()
            out = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "-e", "/dev/null", "--wrap", "true"],
                                 capture_output=True, text=True, check=True, env=self.env).stdout
            submit_at[out.strip().split(";")[0]] = t
            submit_ms.append((time.time() - t) * 1000)
        t_submit = time.time() - t0
        while subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=self.env).stdout.strip():
            time.sleep(0.1)
        polled_end = time.time()
        squeue_ms = timed(["squeue"], COMMAND_RUNS, self.env)
        started, ended = self.log_times()
        missing = set(submit_at) - set(started)
        latency = [(started[j] - submit_at[j]) * 1000 for j in submit_at if j in started]
        last_end = max((ended[j] for j in submit_at if j in ended), default=polled_end)
        return {"jobs": jobs, "submit_rate": jobs / t_submit, "jobs_per_s": jobs / (last_end - t0),
                "latency_ms": latency, "unlogged": len(missing), "submit_ms": submit_ms, "list_ms": squeue_ms}

    def log_times(self) -> tuple[dict[str, float], dict[str, float]]:
        """JobId -> when slurmctld allocated it, and when it completed (from its log, ms resolution)."""
        started, ended = {}, {}
        stamp = r"^\[(\S+)\] "
        for line in (self.root / "slurmctld.log").read_text(errors="replace").splitlines():
            m = re.match(stamp + r".*(?:sched: Allocate|backfill: Started) JobId=(\d+)", line)
            if m:
                started.setdefault(m.group(2), datetime.fromisoformat(m.group(1)).timestamp())
                continue
            m = re.match(stamp + r".*_job_complete: JobId=(\d+) done", line)
            if m:
                ended[m.group(2)] = datetime.fromisoformat(m.group(1)).timestamp()
        return started, ended

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def dist(values: list[float]) -> str:
    return "/".join(f"{percentile(values, p):.1f}" for p in (50, 90, 99)) + " ms"


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `finally` still stops Slurm and the cluster
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--nodes", type=int, default=4, help="cm's local cluster; Slurm's one node gets as many CPUs")
    ap.add_argument("--slurm-cpus", type=int, default=128, help="CPUs configured for Slurm's node")
    ap.add_argument("--no-install", action="store_true")
    args = ap.parse_args()
    cpus = args.slurm_cpus
    print(f"{args.jobs} trivial jobs (`true`), one command per job, submitted one after the other; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the runs")
    why = ensure_slurm(not args.no_install)
    slurm = None
    if why:
        print(f"slurm: MISSING, {why}")
    else:
        root = Path(tempfile.mkdtemp(prefix="cmslurm"))
        os.chmod(root, 0o755)
        s = Slurm(root, cpus)
        try:
            s.start()
            slurm = s.run(args.jobs)
        finally:
            s.stop()
            shutil.rmtree(root, ignore_errors=True)
        print(f"slurm (1 node, {cpus} CPUs): submit {slurm['submit_rate']:.0f} jobs/s, end-to-end "
              f"{slurm['jobs_per_s']:.1f} jobs/s, submit-to-start p50/p90/p99 {dist(slurm['latency_ms'])}"
              + (f" ({slurm['unlogged']} jobs had no Allocate line)" if slurm["unlogged"] else ""))
    cm = run_cm(args.jobs, args.nodes, via_cmrun=True)
    print(f"cm    ({args.nodes} nodes, cmrun): submit {cm['submit_rate']:.0f} jobs/s, end-to-end {cm['jobs_per_s']:.1f} "
          f"jobs/s, submit-to-start p50/p90/p99 {dist(cm['latency_ms'])} ({cm['failed']} failed)")
    api = run_cm(args.jobs, args.nodes)
    print(f"cm    ({args.nodes} nodes, API from one process, the scheduler alone): submit {api['submit_rate']:.0f} "
          f"jobs/s, end-to-end {api['jobs_per_s']:.1f} jobs/s, submit-to-start p50/p90/p99 {dist(api['latency_ms'])}")
    if slurm:
        sb, cr = percentile(slurm["submit_ms"], 50), percentile(cm["submit_ms"], 50)
        sq, ci = percentile(slurm["list_ms"], 50), percentile(cm["list_ms"], 50)
        print(f"commands, median wall clock: submit `sbatch --wrap true` {sb:.1f} ms, `cmrun true` {cr:.1f} ms "
              f"({sb / cr:.2f}x); list the queue `squeue` {sq:.1f} ms, `cminfo` {ci:.1f} ms ({sq / ci:.2f}x)")
        print(f"ratio cm/slurm end-to-end: {cm['jobs_per_s'] / slurm['jobs_per_s']:.1f}x with cmrun, "
              f"{api['jobs_per_s'] / slurm['jobs_per_s']:.1f}x through the API "
              f"(previous measurement: cm 209 jobs/s, Slurm 23 jobs/s)")
    return 0 if cm["failed"] == 0 and api["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
