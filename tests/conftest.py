"""Fixtures: one real database server per session, real daemons per test.

Each test gets its own database name on the shared server and its own run
directory, so tests do not see each other's jobs or nodes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cm.cluster.local import LocalCluster, parse_partitions

_counter = itertools.count()
FAST = {
    "CM_HEARTBEAT_INTERVAL": "0.2",
    "CM_HEARTBEAT_MISSES": "10",  # 2 s: a busy 2-core CI machine can stall a daemon for a second
    "CM_KILL_GRACE": "1",
    "CM_DISPATCH_RETRY": "0.5",
    "CM_DB_TIMEOUT": "1",
    "CM_LOG_LEVEL": "DEBUG",
}


# Suites that must run on CI (CI=true: .ci/run, which installs a Docker engine and runs as root): a skip
# there fails the run, with its reason, instead of passing for what was never tried.
MUST_RUN_ON_CI = ("tests/test_docker.py", "tests/test_guide.py", "tests/test_netns.py", "tests/test_multiuser.py",
                  "tests/test_ui.py")
_skipped_must_run: list[str] = []


@contextlib.contextmanager
def real_users(names, group: str, operators=()):
    """Real Unix users (useradd, no home, no login shell), removed afterwards unless they were there
    before; ``operators`` among them are put in ``group`` (made here if missing). Skips where users cannot
    be made. Yields {name: passwd entry}."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make users and act as them")
    if shutil.which("useradd") is None:
        pytest.skip("no useradd on this machine")
    made = []
    group_made = subprocess.run(["groupadd", group], capture_output=True).returncode == 0
    try:
        for name in names:
            try:
                pwd.getpwnam(name)
            except KeyError:
                proc = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    pytest.skip(f"useradd {name} failed: {proc.stderr.strip()}")
                made.append(name)
        for name in operators:
            subprocess.run(["usermod", "-a", "-G", group, name], capture_output=True, check=True)
        yield {name: pwd.getpwnam(name) for name in names}
    finally:
        for name in made:
            subprocess.run(["userdel", name], capture_output=True)
        if group_made:
            subprocess.run(["groupdel", group], capture_output=True)


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def pytest_runtest_logreport(report):
    if report.skipped and _on_ci() and (report.nodeid.startswith(MUST_RUN_ON_CI) or "needs root" in str(report.longrepr)):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped_must_run.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _skipped_must_run and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if _skipped_must_run:
        terminalreporter.section("tests that must run on CI were skipped (CI=true): this run fails")
        for line in _skipped_must_run:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def database_uri(tmp_path_factory):
    """A real MongoDB-compatible server for the whole session (MONGODB_URI wins)."""
    if os.environ.get("MONGODB_URI"):
        yield os.environ["MONGODB_URI"]
        return
    from cm.cluster.db import DatabaseServer

    server = DatabaseServer()
    uri = server.start(tmp_path_factory.mktemp("db"), log_path=tmp_path_factory.mktemp("dblog") / "db.log")
    try:
        yield uri
    finally:
        server.stop()


@pytest.fixture
def db_name():
    return f"cmtest_{os.getpid()}_{next(_counter)}"


class Cluster(LocalCluster):
    """A LocalCluster with helpers for tests."""

    def cli(self, *argv: str, check: bool = True, timeout: float = 60, cwd: str | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "CM_RUN_DIR": str(self.run_dir), **(env or {})}
        full_env.pop("CM_CONFIG", None)
        exe = Path(sys.executable).parent / argv[0]
        proc = subprocess.run([str(exe), *argv[1:]], capture_output=True, text=True, timeout=timeout, env=full_env,
                              cwd=cwd or str(self.home))
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}\nstdout: {proc.stdout}\n"
                                 f"stderr: {proc.stderr}\nhead log:\n{self.tail('headnode', 40)}")
        return proc

    def submit(self, *argv: str, **kw) -> int:
        return int(self.cli(argv[0], "--parsable", *argv[1:], **kw).stdout.strip())

    def info(self, *argv: str) -> dict:
        return json.loads(self.cli("cminfo", "--json", *argv).stdout)

    def job(self, job_id: int) -> dict:
        return self.info(str(job_id))["jobs"][0]

    def wait_state(self, job_id: int, states, timeout: float = 30) -> dict:
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["state"] in states:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} is {job['state']}, not {states} after {timeout} s\n"
                             f"head log:\n{self.tail('headnode', 60)}")

    def node_states(self) -> dict[str, str]:
        return {n["name"]: n["state"] for n in self.info()["nodes"]}

    def assert_daemons_alive(self) -> None:
        """Every daemon this test started still runs (its process, not a pid that may be a zombie), every
        compute daemon is up as the head sees it, and no daemon's log, read whole, holds a traceback."""
        dead = {name: proc.returncode for name, proc in self.procs.items() if proc.poll() is not None}
        assert not dead, f"daemons exited: {dead}\n" + "\n".join(self.tail(n, 40) for n in dead)
        for log in sorted(self.run_dir.glob("*.log")):
            text = log.read_text(errors="replace")
            at = text.find("Traceback")
            assert at < 0, f"{log.name} holds a traceback:\n{text[max(0, at - 2000):at + 4000]}"
        nodes = self.node_states()
        down = {n: s for n, s in nodes.items() if n in self.procs and s in ("DOWN", "UNKNOWN")}
        assert not down, f"the head sees compute daemons that run as not up: {down}"

    def wait_node(self, name: str, states, timeout: float = 20) -> None:
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.node_states().get(name) in states:
                return
            time.sleep(0.1)
        raise AssertionError(f"{name} is {self.node_states().get(name)}, not {states}")


@pytest.fixture
def make_cluster(database_uri, db_name):
    """Factory: make_cluster(partitions="gpu:2,cpu:2", **settings) -> a running Cluster; stopped after the test."""
    made: list[Cluster] = []
    roots: list[str] = []

    def make(partitions: str = "gpu:2,cpu:2", nodes: int = 4, mongodb_uri: str = "", **settings) -> Cluster:
        root = tempfile.mkdtemp(prefix="cm")  # short: Unix socket paths are limited to 107 bytes
        os.chmod(root, 0o755)  # other users (tests that submit as nobody) must reach the socket
        roots.append(root)
        env = {**FAST, "CM_DB_NAME": db_name, **{f"CM_{k.upper()}": str(v) for k, v in settings.items()}}
        cluster = Cluster(Path(root) / "run", parse_partitions(partitions, nodes), data_dir=Path(root) / "data",
                          env=env, mongodb_uri=mongodb_uri or database_uri)
        cluster.home = Path(root) / "home"
        cluster.home.mkdir()
        made.append(cluster)
        cluster.up(timeout=60)
        return cluster

    yield make
    for cluster in made:
        cluster.down()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster(make_cluster):
    return make_cluster()


def run_as(uid: int, gid: int, fn, groups: list[int] | None = None):
    """fn() in a forked child that has become uid:gid (with groups, default none); returns what fn returned.

    fn's result travels back as JSON; an exception in the child fails the caller with its message.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups(groups or [])
            os.setgid(gid)
            os.setuid(uid)
            result = {"ok": True, "value": fn()}
        except BaseException as exc:  # report anything to the parent, never run pytest in the child
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:4000]}
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    result = json.loads(data)
    if not result["ok"]:
        raise AssertionError(f"child as uid {uid} failed: {result['error']}")
    return result["value"]


def call_as(uid: int, gid: int, run_dir: Path, op: str, /, groups: list[int] | None = None, **args):
    """Make one request to the head from a child process running as uid:gid.

    The child drops privileges after fork and speaks the real client protocol,
    so the head sees that uid through SO_PEERCRED. Returns (ok, data or error).
    """
    from cm.cli.client import Client, HeadError
    from cm.config import load

    def call():
        try:
            return [True, Client(load(env={"CM_RUN_DIR": str(run_dir)})).call(op, **args)]
        except HeadError as exc:
            return [False, str(exc)]

    return tuple(run_as(uid, gid, call, groups))


def gone(pid: int) -> bool:
    """Whether pid no longer runs (absent, or a zombie waiting for its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def wait_pids(path: Path, count: int, timeout: float = 30) -> list[int]:
    """The pids a job's processes write to path, one a line, once ``count`` are there."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= count:
            return [int(x) for x in lines]
        assert time.monotonic() < deadline, f"{len(lines)} of {count} pids in {path} after {timeout} s"
        time.sleep(0.05)


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running after {timeout} s: {[p for p in pids if not gone(p)]}"
        time.sleep(0.05)


def node_dealer(cluster: LocalCluster, name: str, identity: str = ""):
    """A DEALER connected to the head's ROUTER with node ``name``'s CurveZMQ key: a node, as the head sees it
    (routed as ``identity``, by default the name: a key is not bound to a node name)."""
    import zmq

    from cm.keys import secure_client

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.identity = (identity or name).encode()
    secure_client(sock, cluster.run_dir, name)
    sock.connect(f"tcp://127.0.0.1:{cluster.head_port}")
    return sock


@pytest.fixture
def nobody():
    import pwd

    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")
