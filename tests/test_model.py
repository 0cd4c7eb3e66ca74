"""A model-based test of the whole cluster.

A seeded generator writes a list of random but valid operations: command and sync jobs of every shape
(either partition, named nodes, the same node on both sides, -n up to the partition's size, holds,
--requeue, time limits), cancels at random moments, compute daemons killed and restarted, the head
killed and restarted. They run against a real local cluster, and after every step and at the end the
invariants below are checked. A failing list is shrunk (chunks of operations dropped while it still
fails) and the shortest one found is printed, with the seed, so it can be replayed.

`make test` runs fixed seeds for about a minute; `make soak` runs random seeds for longer
(CM_MODEL_SOAK=1, CM_MODEL_SECONDS); CM_MODEL_SEED=N replays one seed.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cm.cli.client import Client, HeadError
from cm.config import load
from test_sync import make_tree, snapshot

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}
ACTIVE = {"DISPATCHING", "RUNNING"}
SHAPE = "gpu:2,cpu:2"
NODES = {"computenode-1": "gpu", "computenode-2": "gpu", "computenode-3": "cpu", "computenode-4": "cpu"}
CPUS, MEM = 4, 4000
GRACE = 1.0  # CM_KILL_GRACE in tests/conftest.py
DETECT = 2.0 + 3.0 + 3.0  # heartbeat timeout + kill confirmation + a busy machine's slack
INFO_LIMIT = 10.0  # cminfo answers within this many seconds (generous: a loaded 2-CPU machine; speed is bench's)
REASONS = {"Resources", "Priority", "ReqNodeNotAvail", "Held", "Blocked", "None"}


# --- operations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    kind: str  # cmd, sync, cancel, hold, release, kill_node, start_node, restart_head, pause
    args: tuple = ()

    def __str__(self) -> str:
        a = self.args
        if self.kind == "cmd":
            part, n, cpus, dur, limit, requeue, hold, job = a
            flags = (" --requeue" if requeue else "") + (" --hold" if hold else "")
            return f"#{job}: cmrun -n {n} -c {cpus} --partition {part} -t 0:{limit:02d}{flags} sleep {dur}"
        if self.kind == "sync":
            src, dst, n, job = a
            return f"#{job}: cmsync -n {n} -t 0:30 {src} {dst}"
        if self.kind in ("cancel", "hold", "release"):
            return {"cancel": "cmkill", "hold": "cmcontrol hold", "release": "cmcontrol release"}[self.kind] + \
                f" #{a[0]}"
        if self.kind == "pause":
            return f"sleep {a[0]}"
        return f"{self.kind} {' '.join(map(str, a))}".strip()


def generate(seed: int, count: int) -> list[Op]:
    """`count` operations, valid for the model (a dead node is only started, at most one dead at once)."""
    rng = random.Random(seed)
    ops: list[Op] = []
    jobs = 0
    dead: str | None = None
    frozen = False
    head_restarts = 0
    for _ in range(count):
        roll = rng.random()
        if roll < 0.38:
            part = rng.choice(["gpu", "cpu"])
            limit = rng.randint(2, 6)
            dur = round(rng.uniform(0.1, 1.3 * limit), 1)
            ops.append(Op("cmd", (part, rng.randint(1, 2), rng.randint(1, CPUS), dur, limit, rng.random() < 0.3,
                                  rng.random() < 0.1, jobs)))
            jobs += 1
        elif roll < 0.55:
            shape = rng.choice(["across", "within", "same-node", "node-to-node"])
            part = rng.choice(["gpu", "cpu"])
            other = "cpu" if part == "gpu" else "gpu"
            names = [n for n, p in NODES.items() if p == part]
            n = rng.randint(1, 2)
            if shape == "across":
                src, dst = f"{part}:/tree", f"{other}:/copy{jobs}"
            elif shape == "within":
                src, dst = f"{part}:/tree", f"{part}:/copy{jobs}"
            elif shape == "same-node":
                node = rng.choice(names)
                src, dst, n = f"{node}:/tree", f"{node}:/copy{jobs}", 1
            else:
                a, b = rng.sample(names, 2)
                src, dst, n = f"{a}:/tree", f"{b}:/copy{jobs}", 1
            ops.append(Op("sync", (src, dst, n, jobs)))
            jobs += 1
        elif roll < 0.70 and jobs:
            # often the job just submitted: a cancel while it is being dispatched or starting
            ops.append(Op("cancel", (jobs - 1 if rng.random() < 0.3 else rng.randrange(jobs),)))
        elif roll < 0.74 and jobs:
            ops.append(Op(rng.choice(["hold", "release"]), (rng.randrange(jobs),)))
        elif roll < 0.82:
            if dead:
                ops.append(Op("thaw_node" if frozen else "start_node", (dead,)))
                dead = None
            else:
                # killed (SIGKILL, started again later), or frozen (SIGSTOP: a hung daemon, or a node cut off)
                dead, frozen = rng.choice(list(NODES)), rng.random() < 0.35
                ops.append(Op("freeze_node" if frozen else "kill_node", (dead,)))
        elif roll < 0.85 and head_restarts < 2:
            ops.append(Op("restart_head"))
            head_restarts += 1
        else:
            ops.append(Op("pause", (round(rng.uniform(0.1, 1.2), 1),)))
    return ops


# --- running them ------------------------------------------------------------------------------


class Violation(AssertionError):
    def __init__(self, step: int, what: str, detail: str):
        where = f"after {-step} steps" if step < 0 else f"step {step}"
        super().__init__(f"{where}: {what}: {detail}")
        self.step, self.what = step, what


@dataclass
class Model:
    """What the test knows: the jobs it submitted and what it asked of them."""

    ids: dict[int, int] = field(default_factory=dict)  # generator's job number -> job id
    ops: dict[int, Op] = field(default_factory=dict)  # job id -> its submit
    cancelled: dict[int, float] = field(default_factory=dict)  # job id -> when cmkill was answered
    head_down: list[tuple[float, float]] = field(default_factory=list)  # (from, to), monotonic
    dead: set[str] = field(default_factory=set)
    frozen: set[str] = field(default_factory=set)


class Runner:
    def __init__(self, cluster, log: Path):
        self.cluster, self.log = cluster, log
        self.model = Model()
        self.settings = load(env={"CM_RUN_DIR": str(cluster.run_dir)})
        self.step = 0

    def call(self, op: str, **args):
        client = Client(self.settings, timeout=10)
        try:
            return client.call(op, **args)
        finally:
            client.close()

    def downtime_since(self, t: float) -> float:
        return sum(b - max(a, t) for a, b in self.model.head_down if b > t)

    # operations

    def apply(self, op: Op) -> None:
        m = self.model
        if op.kind == "cmd":
            part, n, cpus, dur, limit, requeue, hold, job = op.args
            script = (f"echo start $CM_JOB_ID $CM_NODE_RANK >> {self.log}; sleep {dur}; "
                      f"echo end $CM_JOB_ID $CM_NODE_RANK >> {self.log}")
            data = self.call("submit", job=dict(
                kind="command", argv=["sh", "-c", script], cwd=str(self.cluster.home),
                env=[f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}"], nodes=n, procs=1, cpus=cpus, mem_mb=0,
                time=f"0:{limit:02d}", name=f"model{job}", partition=part, requeue=requeue, hold=hold))
            m.ids[job] = data["job_id"]
            m.ops[data["job_id"]] = op
        elif op.kind == "sync":
            src, dst, n, job = op.args
            data = self.call("submit", job=dict(kind="sync", src=src, dst=dst, nodes=n, time="0:30",
                                                name=f"sync{job}", cwd=str(self.cluster.home), options={}))
            m.ids[job] = data["job_id"]
            m.ops[data["job_id"]] = op
        elif op.kind in ("cancel", "hold", "release"):
            job_id = m.ids.get(op.args[0])
            if job_id is None:
                return  # its submit was shrunk away
            try:
                if op.kind == "cancel":
                    reply = self.call("cancel", job_ids=[job_id])[str(job_id)]
                    if reply["ok"]:
                        m.cancelled.setdefault(job_id, time.monotonic())
                else:
                    self.call("control", action=op.kind, job_id=job_id)
            except HeadError:
                pass  # e.g. releasing a job that is not held: refused, and that is fine
        elif op.kind == "kill_node":
            name = op.args[0]
            if name not in m.dead:
                self.cluster.kill(name, signal.SIGKILL)
                m.dead.add(name)
        elif op.kind == "start_node":
            name = op.args[0]
            if name in m.dead:
                self.cluster.start_node(name, NODES[name])
                m.dead.discard(name)
        elif op.kind == "freeze_node":
            name = op.args[0]
            if name not in m.dead and name not in m.frozen:
                self.cluster.procs[name].send_signal(signal.SIGSTOP)
                m.frozen.add(name)
        elif op.kind == "thaw_node":
            name = op.args[0]
            if name in m.frozen:
                self.cluster.procs[name].send_signal(signal.SIGCONT)
                m.frozen.discard(name)
        elif op.kind == "restart_head":
            t = time.monotonic()
            self.cluster.kill("headnode", signal.SIGKILL)
            self.cluster.start_head()
            self.cluster.wait_head()
            m.head_down.append((t, time.monotonic()))
        elif op.kind == "pause":
            time.sleep(op.args[0])

    # invariants

    def info(self) -> dict:
        """cminfo --all, which must answer within INFO_LIMIT (a second try forgives one stall of the machine)."""
        for attempt in range(2):
            t = time.monotonic()
            data = self.call("info", all=True)
            took = time.monotonic() - t
            if took < INFO_LIMIT:
                return data
        raise Violation(self.step, "cminfo slow", f"answered in {took:.2f} s")

    def check(self, final: bool = False) -> dict:
        data = self.info()
        now_wall, now = time.time(), time.monotonic()
        jobs = {j["id"]: j for j in data["jobs"]}
        # no node holds CPUs or memory for a job that is not active there
        expected: dict[str, int] = collections.Counter()
        for j in jobs.values():
            if j["state"] in ACTIVE:
                op = self.model.ops.get(j["id"])
                per_node = op.args[2] if op is not None and op.kind == "cmd" else 1
                for name in j["nodes"]:
                    expected[name] += per_node
        for n in data["nodes"]:
            used = n["cpus"] - n["cpus_free"]
            if used > expected[n["name"]] or (n["mem_free_mb"] != n["mem_mb"] and not expected[n["name"]]):
                raise Violation(self.step, "allocation leak",
                                f"{n['name']} has {used} CPUs in use, active jobs there hold {expected[n['name']]}")
            if n["state"] == "DRAIN":
                raise Violation(self.step, "node drained", f"{n['name']}: {n.get('reason')}")
        # every job ends in time; a cancelled one within the grace plus 5 s
        for job_id, j in jobs.items():
            if j["state"] in FINAL:
                continue
            if j["state"] in ("PENDING", "HELD") and j["reason"].split(";")[0] not in REASONS:
                raise Violation(self.step, "waiting without a reason", f"job {job_id}: {j['reason']!r}")
            started = (j.get("times") or {}).get("started")
            if j["state"] in ACTIVE and started:
                limit = j["time_limit"] + GRACE + DETECT + self.downtime_since(now - (now_wall - started))
                if now_wall - started > limit:
                    raise Violation(self.step, "job outlived its time limit",
                                    f"job id {job_id} {j['state']} for {now_wall - started:.1f} s, limit "
                                    f"{j['time_limit']} s ({self.model.ops.get(job_id)})")
            asked = self.model.cancelled.get(job_id)
            if asked is not None and now - asked > GRACE + 5 + self.downtime_since(asked):
                raise Violation(self.step, "cancel not done",
                                f"job id {job_id} still {j['state']} {now - asked:.1f} s after cmkill "
                                f"({self.model.ops.get(job_id)}); reason {j.get('reason')!r}")
        self.check_runs(jobs, final)
        return data

    def check_runs(self, jobs: dict, final: bool) -> None:
        """Nothing runs twice: each rank of a job without --requeue starts once; a completed job ran to its end."""
        try:
            lines = collections.Counter(tuple(line.split()) for line in self.log.read_text().splitlines())
        except FileNotFoundError:
            lines = collections.Counter()
        for job_id, op in self.model.ops.items():
            if op.kind != "cmd":
                continue
            n, requeue = op.args[1], op.args[5]
            for rank in range(n):
                starts = lines[("start", str(job_id), str(rank))]
                if starts > 1 and not requeue:
                    raise Violation(self.step, "ran twice", f"job {job_id} rank {rank} started {starts} times")
                if final and jobs[job_id]["state"] == "COMPLETED" and lines[("end", str(job_id), str(rank))] < 1:
                    raise Violation(self.step, "completed without running",
                                    f"job {job_id} rank {rank}: {starts} starts, no end")

    def finish(self, seconds: float) -> None:
        """Bring dead nodes back, cancel held jobs, and wait for every job to end; then the final checks."""
        for name in list(self.model.dead):
            self.apply(Op("start_node", (name,)))
        for name in list(self.model.frozen):
            self.apply(Op("thaw_node", (name,)))
        deadline = time.monotonic() + seconds
        self.step = -(self.step + 1)  # the end phase: after that many steps
        while True:
            data = self.check()
            jobs = {j["id"]: j for j in data["jobs"]}
            for j in jobs.values():
                if j["state"] == "HELD":
                    self.apply(Op("cancel", (next(k for k, v in self.model.ids.items() if v == j["id"]),)))
            if all(j["state"] in FINAL for j in jobs.values()):
                break
            if time.monotonic() > deadline:
                left = {i: (j["state"], j.get("reason")) for i, j in jobs.items() if j["state"] not in FINAL}
                raise Violation(self.step, "jobs never ended", str(left))
            time.sleep(0.3)
        data = self.check(final=True)
        for n in data["nodes"]:
            if n["cpus_free"] != n["cpus"] or n["state"] in ("DOWN", "UNKNOWN"):
                raise Violation(self.step, "node not free at the end", str(n))
        jobs = {j["id"]: j for j in data["jobs"]}
        for job_id, op in self.model.ops.items():
            if op.kind == "sync" and jobs[job_id]["state"] == "COMPLETED":
                src, dst = (self._path(side) for side in op.args[:2])
                if snapshot(dst) != snapshot(src):
                    raise Violation(self.step, "sync differs", f"job {job_id} ({op}): {dst} differs from {src}")
        print("model: jobs ended", dict(collections.Counter(
            (self.model.ops[i].kind if i in self.model.ops else "?", j["state"]) for i, j in jobs.items())),
            flush=True)
        deadline = time.monotonic() + GRACE + 3
        while (left := self._leftovers()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:
            raise Violation(self.step, "processes left running", str(left))

    def _path(self, spec: str) -> Path:
        where, path = spec.split(":", 1)
        return self.cluster.data_dir / NODES.get(where, where) / path.strip("/")

    def _leftovers(self) -> list[int]:
        """Pids of job processes of this run still alive (their command line names our log)."""
        mine = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    if str(self.log).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                        mine.append(int(pid))
                except OSError:
                    pass
        return mine


def run_ops(make_cluster, ops: list[Op], db_name: str, end_seconds: float = 60) -> None:
    """Run ops on a fresh cluster; raise Violation at the first broken invariant."""
    cluster = make_cluster(SHAPE, nodes=4, chunk_mb=1, cpus=CPUS, mem_mb=MEM, db_name=db_name)
    try:
        for part in ("gpu", "cpu"):
            make_tree(cluster.data_dir / part / "tree", big=1 << 20, small=30)
        runner = Runner(cluster, cluster.home / "ran.log")
        for i, op in enumerate(ops):
            runner.step = i
            try:
                runner.apply(op)
            except HeadError as exc:
                raise Violation(i, "request failed", f"{op}: {exc}") from None
            runner.check()
        runner.finish(end_seconds)
    finally:
        for proc in cluster.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a frozen daemon could not stop
        cluster.down()


def shrink(ops: list[Op], fails, budget: float) -> list[Op]:
    """Drop chunks of operations while the list still fails (the same way): a shorter reproduction."""
    deadline = time.monotonic() + budget
    chunk = max(1, len(ops) // 2)
    while chunk >= 1 and time.monotonic() < deadline:
        i, removed = 0, False
        while i < len(ops) and time.monotonic() < deadline:
            candidate = ops[:i] + ops[i + chunk:]
            if candidate and fails(candidate):
                ops, removed = candidate, True
            else:
                i += chunk
        if not removed:
            chunk //= 2
    return ops


def explore(make_cluster, db_name: str, seed: int, count: int) -> None:
    ops = generate(seed, count)
    attempts = collections.Counter()

    def failure(candidate: list[Op]) -> Violation | None:
        attempts["runs"] += 1
        try:
            run_ops(make_cluster, candidate, f"{db_name}_{seed}_{attempts['runs']}")
        except Violation as exc:
            return exc
        return None

    first = failure(ops)
    if first is None:
        return
    last = [first]

    def fails_the_same_way(candidate: list[Op]) -> bool:
        v = failure(candidate)
        if v is not None and v.what == first.what:
            last.append(v)
            return True
        return False

    budget = float(os.environ.get("CM_MODEL_SHRINK_SECONDS", "300"))
    shortest = shrink(ops, fails_the_same_way, budget)
    steps = "\n".join(f"  {i:3d}. {op}" for i, op in enumerate(shortest))
    pytest.fail(f"seed {seed}: {first}\nshortest sequence found ({len(shortest)} of {len(ops)} operations, "
                f"{attempts['runs']} runs) that fails the same way:\n{steps}\nwhich ends in: {last[-1]}\n"
                f"replay: CM_MODEL_SEED={seed} CM_MODEL_OPS={count} .venv/bin/python -m pytest tests/test_model.py",
                pytrace=False)


def _seeds() -> list[int]:
    if os.environ.get("CM_MODEL_SEED"):
        return [int(os.environ["CM_MODEL_SEED"])]
    if os.environ.get("CM_MODEL_SOAK"):
        return [random.SystemRandom().randrange(1 << 32)]
    return [14, 3]


def test_the_cluster_keeps_its_promises_under_random_operations(make_cluster, db_name):
    count = int(os.environ.get("CM_MODEL_OPS", "60"))
    if os.environ.get("CM_MODEL_SOAK"):
        end = time.monotonic() + float(os.environ.get("CM_MODEL_SECONDS", "900"))
        while time.monotonic() < end:
            seed = random.SystemRandom().randrange(1 << 32)
            print(f"model: seed {seed}, {count} operations", flush=True)
            explore(make_cluster, db_name, seed, count)
        return
    for seed in _seeds():
        print(f"model: seed {seed}, {count} operations", flush=True)
        explore(make_cluster, db_name, seed, count)


def test_shrinking_keeps_only_what_the_failure_needs():
    ops = [Op("pause", (i,)) for i in range(20)]
    needed = {ops[3], ops[11]}
    runs = []

    def fails(candidate):
        runs.append(candidate)
        return needed <= set(candidate)

    assert shrink(ops, fails, budget=10) == [ops[3], ops[11]]


def test_the_generator_is_repeatable_and_varied():
    assert generate(5, 200) == generate(5, 200)
    kinds = collections.Counter(op.kind for op in generate(5, 200))
    assert {"cmd", "sync", "cancel", "kill_node", "start_node", "freeze_node", "thaw_node", "restart_head",
            "pause"} <= set(kinds)
    shapes = {op.args[0].split(":")[0] == op.args[1].split(":")[0] for op in generate(5, 200) if op.kind == "sync"}
    assert shapes == {True, False}  # same storage/node and across
