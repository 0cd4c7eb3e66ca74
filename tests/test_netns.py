"""The cluster with hosts of their own: every daemon in its own network namespace (issue 4, items 1 and 3).

Real daemons: the database, the head and each compute node run in a network
namespace of their own on one bridge, and reach each other by name
(`headnode`, `db`, `computenode-N`) as in docker-compose. A network partition
is a node's bridge port taken down while its daemon keeps running.

Needs root and iproute2; skipped with the reason where namespaces cannot be made.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cm.cluster.local import ClusterError, LocalCluster, parse_partitions, pid_alive
from cm.cluster import netns
from cm.cluster.netns import Network, NetnsError, cleanup_stale, namespaces
from conftest import FAST, Cluster, wait_gone, wait_pids

REASON = netns.unavailable_reason()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"network namespaces cannot be made here: {REASON}")


def _db_unavailable() -> str | None:
    from cm.cluster.db import DatabaseUnavailable, server_plan

    try:
        server_plan()
    except DatabaseUnavailable as exc:
        return str(exc)
    return None


needs_db = pytest.mark.skipif(_db_unavailable() is not None, reason=f"no database server: {_db_unavailable()}")


def host_links(prefix: str) -> list[str]:
    """Interfaces of this (the host's) network namespace tied to network prefix: there must be none, ever."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if f"link-netns {prefix}-" in line or f"alias {prefix}" in line]


def leftovers(prefix: str) -> list[str]:
    """Anything of network prefix still on the machine."""
    found = [f"namespace {n}" for n in os.listdir("/run/netns") if n.startswith(prefix + "-")] \
        if os.path.isdir("/run/netns") else []
    if os.path.isdir("/etc/netns"):
        found += [f"/etc/netns/{n}" for n in os.listdir("/etc/netns") if n.startswith(prefix + "-")]
    return found


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def wait_for(what, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(message)


def make_prefix(tag: str) -> str:
    return f"t{tag}{os.getpid()}"  # a prefix per test session: never another session's network


@pytest.fixture(scope="module", autouse=True)
def no_networks_of_dead_sessions():
    """Remove what an earlier session killed hard (SIGKILL, power cut) left behind: its pid is in the prefix."""
    if REASON is not None:
        return
    names = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    names |= set(os.listdir("/etc/netns")) if os.path.isdir("/etc/netns") else set()
    for prefix in {m.group(1) for m in map(re.compile(r"^(t[cnsf](\d+))-").match, names) if m}:
        if not os.path.exists(f"/proc/{prefix[2:]}"):
            cleanup_stale(prefix)


# --- the cluster in namespaces --------------------------------------------------------

# fast heartbeats, but 2 s of silence before DOWN: on a loaded 2-core machine a node's loop was seen to stall
# for just over 1 s while starting a job (false DOWN with the 1 s of tests/conftest.py's FAST)
SETTINGS = {**FAST, "CM_HEARTBEAT_INTERVAL": "0.2", "CM_HEARTBEAT_MISSES": "10", "CM_DB_NAME": "cmnetns"}
HEARTBEAT_TIMEOUT = 0.2 * 10


@pytest.fixture(scope="module")
def ncluster():
    """head + gpu:2 + cpu:2 and the database, each in a namespace of its own; removed even if a test fails."""
    if REASON is not None:
        pytest.skip(f"network namespaces cannot be made here: {REASON}")
    if _db_unavailable():
        pytest.skip(f"no database server: {_db_unavailable()}")
    root = tempfile.mkdtemp(prefix="cmn")  # short: the head's Unix socket path is limited
    os.chmod(root, 0o755)
    cluster = Cluster(Path(root) / "run", parse_partitions("gpu:2,cpu:2", 4), data_dir=Path(root) / "data",
                      db_dir=Path(root) / "db", env=SETTINGS, netns=True,
                      netns_prefix=make_prefix("c"))
    cluster.home = Path(root) / "home"
    cluster.home.mkdir()
    try:
        cluster.up(timeout=60)
        yield cluster
    finally:
        try:
            cluster.down()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    assert leftovers(cluster.netns_prefix) == []
    assert host_links(cluster.netns_prefix) == []


@needs_netns
@needs_db
def test_every_daemon_has_a_host_of_its_own_and_a_job_runs_on_two_of_them(ncluster):
    names = ["db", "headnode", "computenode-1", "computenode-2", "computenode-3", "computenode-4"]
    pids = {n: int(ncluster.pidfile(n).read_text()) for n in names}
    # the pid files hold the daemons' own pids, each in its own namespace, none in ours
    spaces = {n: netns_of(p) for n, p in pids.items()}
    assert len(set(spaces.values())) == len(names)
    assert netns_of(os.getpid()) not in spaces.values()
    for name, pid in pids.items():
        ns = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True).stdout.strip()
        assert ns == ncluster.network.namespace(name)
        assert pid_alive(pid)
    assert len({ncluster.network.ip(n) for n in names}) == len(names)
    # a job on two nodes: the nodelist, each rank on its own host, names resolving as in docker-compose
    job_id = ncluster.submit("cmrun", "-n", "2", "--partition", "gpu", "--wait", "sh", "-c",
                             'echo "$CM_NODELIST $CM_NODENAME $(hostname -I)"; getent hosts headnode db')
    assert ncluster.job(job_id)["state"] == "COMPLETED"
    for rank, node in enumerate(["computenode-1", "computenode-2"]):
        out = (ncluster.home / "cmlogs" / str(job_id) / node / f"{rank}.out").read_text().split()
        assert out[:3] == ["computenode-1,computenode-2", node, ncluster.network.ip(node)]
        assert out[3:] == [ncluster.network.ip("headnode"), "headnode", ncluster.network.ip("db"), "db"]


def make_tree(root: Path) -> None:
    rng = random.Random(4)
    (root / "a" / "b").mkdir(parents=True)
    (root / "big.bin").write_bytes(rng.randbytes(5 << 20))
    for i in range(40):
        (root / "a" / f"f{i}.txt").write_bytes(rng.randbytes(rng.randint(0, 5000)))
    (root / "a" / "b" / "deep.txt").write_text("deep\n")
    (root / "mode600").write_text("secret\n")
    (root / "mode600").chmod(0o600)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), oct(p.stat().st_mode), None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


@needs_netns
@needs_db
def test_a_sync_between_partitions_crosses_the_bridge(ncluster):
    src = ncluster.data_dir / "gpu" / "x"
    make_tree(src)
    proc = ncluster.cli("cmsync", "--wait", "gpu:/x", "cpu:/y")
    assert proc.returncode == 0
    assert snapshot(ncluster.data_dir / "cpu" / "y") == snapshot(src)
    # the receiver was reached at the name it advertised, on the bridge
    job = ncluster.info("--all")["jobs"][-1]
    assert job["type"] == "sync" and job["state"] == "COMPLETED"
    assert any(n in ("computenode-3", "computenode-4") for n in job["nodes"])


@needs_netns
@needs_db
def test_a_partitioned_node_goes_down_comes_back_and_its_job_is_reconciled(ncluster):
    """Cut a node's link mid-job: DOWN, the job NODE_FAIL; restore it: the same daemon is back, its stale
    share is stopped, and nothing ran twice."""
    victim, other = "computenode-4", "computenode-3"
    daemon_pid = int(ncluster.pidfile(victim).read_text())
    job_id = ncluster.submit("cmrun", "-n", "2", "--partition", "cpu", "sh", "-c",
                             'echo "$CM_NODENAME $$" >> procs; echo "$CM_NODENAME" >> runs; exec sleep 120')
    ncluster.wait_state(job_id, "RUNNING")
    procs_file = ncluster.home / "procs"
    wait_for(lambda: len(procs_file.read_text().split("\n")) > 2 if procs_file.exists() else False, 10,
             "the job's processes did not start on both nodes")
    pids = {line.split()[0]: int(line.split()[1]) for line in procs_file.read_text().splitlines()}
    assert set(pids) == {victim, other}
    assert netns_of(pids[victim]) == netns_of(daemon_pid)  # the job runs inside the node's host
    cut_at = time.monotonic()
    ncluster.cut(victim)
    try:
        ncluster.wait_node(victim, "DOWN", timeout=10)
        down_after = time.monotonic() - cut_at
        job = ncluster.wait_state(job_id, "NODE_FAIL", timeout=10)
        assert victim in job["reason"]
        # the healthy node's share is stopped at once; the cut-off one cannot hear the head yet
        wait_for(lambda: not pid_alive(pids[other]), 10, f"the job's process on {other} was not stopped")
        assert pid_alive(pids[victim]) and pid_alive(daemon_pid)
    finally:
        ncluster.restore(victim)
    # DOWN within the heartbeat timeout, plus a head tick and the time cminfo takes to say so
    assert down_after < HEARTBEAT_TIMEOUT + 3, f"DOWN only after {down_after:.1f} s"
    ncluster.wait_node(victim, {"IDLE", "MIXED"}, timeout=20)
    assert ncluster.procs[victim].poll() is None and int(ncluster.pidfile(victim).read_text()) == daemon_pid
    # reconciled: the head does not know this run any more, so the node stops it
    wait_for(lambda: not pid_alive(pids[victim]), 15, f"the stale share on {victim} is still running after reconnect")
    time.sleep(1.0)  # a late report must not revive or restart the job
    job = ncluster.job(job_id)
    assert job["state"] == "NODE_FAIL"
    assert sorted((ncluster.home / "runs").read_text().split()) == sorted([victim, other])  # each share once
    # the node takes work again, and its CPUs are all free
    nodes = {n["name"]: n for n in ncluster.info()["nodes"]}
    assert nodes[victim]["cpus_free"] == nodes[victim]["cpus"]
    again = ncluster.submit("cmrun", "-n", "2", "--partition", "cpu", "--wait", "sh", "-c", 'echo "$CM_NODENAME" >> later')
    assert ncluster.job(again)["state"] == "COMPLETED"
    assert sorted((ncluster.home / "later").read_text().split()) == sorted([victim, other])
    assert sorted((ncluster.home / "runs").read_text().split()) == sorted([victim, other])


@needs_netns
@needs_db
def test_a_requeued_job_sent_back_to_its_partitioned_node_never_runs_twice(ncluster):
    """--requeue, and the only place it can run again is the node it was cut off on: after the link is
    restored the stale run must be gone (SIGKILL after the grace, it ignores SIGTERM) while the new one runs."""
    victim = "computenode-4"
    cpus = {n["name"]: n["cpus"] for n in ncluster.info()["nodes"]}["computenode-3"]
    blocker = ncluster.submit("cmrun", "--partition", "cpu", "-c", str(cpus), "sleep", "60")  # fills the other one
    blocked_on = ncluster.wait_state(blocker, "RUNNING")["nodes"]
    job_id = None
    try:
        assert blocked_on == ["computenode-3"]
        job_id = ncluster.submit("cmrun", "--partition", "cpu", "--requeue", "sh", "-c",
                                 'trap "" TERM; echo "$CM_NODENAME $$" >> requeued; exec sleep 20')
        assert ncluster.wait_state(job_id, "RUNNING")["nodes"] == [victim]
        lines = ncluster.home / "requeued"
        wait_for(lambda: lines.exists() and lines.read_text().count("\n") == 1, 10, "the job did not start")
        ncluster.cut(victim)
        try:
            ncluster.wait_node(victim, "DOWN", timeout=10)
            ncluster.wait_state(job_id, "PENDING", timeout=10)  # requeued; nowhere else to go
        finally:
            ncluster.restore(victim)
        ncluster.wait_state(job_id, "RUNNING", timeout=20)
        wait_for(lambda: lines.read_text().count("\n") == 2, 10, "the requeued job did not start again")
        (_, first), (_, second) = (line.split() for line in lines.read_text().splitlines())
        # kill grace is 1 s: the first run must be gone well within 5 s, the second one running
        wait_for(lambda: not pid_alive(int(first)), 5,
                 f"job {job_id} runs twice on {victim}: the stale run (pid {first}) outlived the new one's start")
        assert pid_alive(int(second))
    finally:
        ncluster.cli("cmkill", str(blocker), *([str(job_id)] if job_id else []), check=False)
        for pid in ncluster.network.pids(victim):  # the stale run escaped the node's purge: do not leave it
            if int(ncluster.pidfile(victim).read_text()) != pid:
                os.kill(pid, 9)


@needs_netns
@needs_db
def test_a_compute_daemon_killed_on_its_host_makes_it_down_and_its_job_node_fail(ncluster):
    job_id = ncluster.submit("cmrun", "--partition", "gpu", "-n", "2", "sleep", "30")
    victim = ncluster.wait_state(job_id, "RUNNING")["nodes"][1]
    ncluster.kill(victim, signal.SIGKILL)
    try:
        ncluster.wait_node(victim, "DOWN", timeout=HEARTBEAT_TIMEOUT + 8)
        assert "stopped answering" in ncluster.wait_state(job_id, "NODE_FAIL", timeout=15)["reason"]
    finally:
        ncluster.start_node(victim, "gpu")
    ncluster.wait_node(victim, "IDLE", timeout=20)


@needs_netns
@needs_db
def test_a_head_killed_on_its_host_and_restarted_loses_nothing(ncluster):
    job_id = ncluster.submit("cmrun", "--partition", "cpu", "-n", "2", "sh", "-c",
                             "echo $$ >> head-pids; while [ ! -e head-go ]; do sleep 0.05; done; "
                             "echo $CM_NODENAME >> head-restart")
    ncluster.wait_state(job_id, "RUNNING")
    pids = wait_pids(ncluster.home / "head-pids", 2)
    ncluster.kill("headnode", signal.SIGKILL)
    (ncluster.home / "head-go").write_text("")
    wait_gone(pids)  # the job ended while the head was away; the nodes keep its end until acknowledged
    ncluster.start_head()
    ncluster.wait_head()
    job = ncluster.wait_state(job_id, "COMPLETED", timeout=30)
    assert sorted((ncluster.home / "head-restart").read_text().split()) == sorted(job["nodes"])  # once each
    assert [j["id"] for j in ncluster.info("--all")["jobs"]].count(job_id) == 1


@needs_netns
@needs_db
def test_a_database_outage_on_its_host_is_waited_out(ncluster):
    job_id = ncluster.submit("cmrun", "--partition", "gpu", "sh", "-c", "sleep 3; echo done > outage-done")
    ncluster.wait_state(job_id, "RUNNING")
    ncluster.kill("db", signal.SIGTERM)
    try:
        deadline = time.monotonic() + 5
        while True:
            proc = ncluster.cli("cminfo", check=False, timeout=10)
            assert "Traceback" not in proc.stderr
            if proc.returncode != 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert proc.returncode != 0 and "database is unreachable" in proc.stderr
        time.sleep(10)
    finally:
        ncluster.start_db()
    assert (ncluster.home / "outage-done").exists()
    assert ncluster.wait_state(job_id, "COMPLETED", timeout=30)["exit_code"] == 0
    assert ncluster.job(ncluster.submit("cmrun", "--wait", "true"))["state"] == "COMPLETED"


# --- the network itself ---------------------------------------------------------------


@needs_netns
def test_teardown_after_a_failure_leaves_nothing_behind():
    prefix = make_prefix("n")
    net = Network(prefix, "10.203.7.0/24")
    sleeper = None
    with pytest.raises(RuntimeError, match="a test failed"):
        with net:
            assert net.add_host("alpha") == "10.203.7.1"
            assert net.add_host("beta") == "10.203.7.2"
            # every hosts file lists every host, also those added later
            hosts = Path(f"/etc/netns/{prefix}-alpha/hosts").read_text()
            assert "10.203.7.2\tbeta" in hosts and "10.203.7.1\talpha" in hosts
            assert host_links(prefix) == []  # the bridge and its ports live in the switch namespace
            sleeper = subprocess.Popen(net.wrap("beta", ["sleep", "60"]))
            wait_for(lambda: net.pids("beta") == [sleeper.pid], 5, "the process is not in beta's namespace")
            out = subprocess.run(net.wrap("alpha", ["getent", "hosts", "beta"]), capture_output=True, text=True)
            assert out.stdout.split() == ["10.203.7.2", "beta"]
            # a partition: the link goes down and comes back, the process keeps running
            server = subprocess.Popen(net.wrap("beta", [sys.executable, "-m", "http.server", "--bind", "0.0.0.0",
                                                        "8123"]), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            wait_for(lambda: net.connectable("beta", 8123, src="alpha"), 10, "beta's server is not reachable")
            net.cut("beta")
            assert net.is_cut("beta") and not net.connectable("beta", 8123, src="alpha", timeout=0.3)
            net.restore("beta")
            assert not net.is_cut("beta")
            wait_for(lambda: net.connectable("beta", 8123, src="alpha"), 5, "beta is not reachable after restore")
            assert server.poll() is None
            raise RuntimeError("a test failed")
    assert sleeper.wait(5) == -9 and server.wait(5) == -9  # killed by the teardown
    assert leftovers(prefix) == []
    assert host_links(prefix) == []
    net.teardown()  # again: nothing to do, no error


@needs_netns
def test_cleanup_stale_removes_what_a_crashed_run_left():
    prefix = make_prefix("s")
    code = ("import sys, subprocess, os\n"
            "from cm.cluster.netns import Network\n"
            f"n = Network({prefix!r}, '10.203.9.0/24'); n.create(); n.add_host('one'); n.add_host('two')\n"
            "p = subprocess.Popen(n.wrap('one', ['sleep', '60']), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(p.pid, flush=True)\n"
            "os._exit(0)  # crash: no teardown\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        orphan = int(out.stdout.split()[0])
        assert pid_alive(orphan)
        assert len(leftovers(prefix)) == 5  # namespaces switch, one, two; /etc/netns of one and two
        with pytest.raises(NetnsError, match="already exists"):
            Network(prefix).create()
        assert sorted(cleanup_stale(prefix)) == [f"{prefix}-one", f"{prefix}-switch", f"{prefix}-two"]
        wait_for(lambda: not pid_alive(orphan), 5, "the orphan in the stale namespace is still running")
        assert leftovers(prefix) == [] and namespaces(prefix) == []
        assert cleanup_stale(prefix) == []
    finally:
        cleanup_stale(prefix)


@needs_netns
@needs_db
def test_a_failed_start_in_netns_mode_removes_the_network_and_the_database():
    root = tempfile.mkdtemp(prefix="cmf")
    prefix = make_prefix("f")
    spawned = []

    class Recording(LocalCluster):
        def _spawn(self, name, argv, env):
            spawned.append(proc := super()._spawn(name, argv, env))
            return proc

    cluster = Recording(Path(root) / "run", parse_partitions("gpu:1", 1), data_dir=Path(root) / "data",
                           db_dir=Path(root) / "db", env={"CM_HEARTBEAT_MISSES": "0"},  # daemons refuse to start
                           netns=True, netns_prefix=prefix)
    try:
        with pytest.raises(ClusterError, match="exited with"):
            cluster.up(timeout=30)
        assert leftovers(prefix) == []
        assert list(cluster.run_dir.glob("*.pid")) == [] and not cluster.netns_file.exists()
        assert [p.args[-1] for p in spawned][:2] == [str(cluster.db_dir), "head"]  # the database did start
        for proc in spawned:
            proc.wait(5)
    finally:
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)


def test_clear_errors_where_namespaces_cannot_be_made(monkeypatch, tmp_path):
    with pytest.raises(NetnsError, match="bad network prefix"):
        Network("has-dash")
    with pytest.raises(NetnsError, match="bad subnet"):
        Network("ok", "10.0.0.0/33")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsError, match="need root"):
        Network("ok").create()
    assert "need root" in netns.unavailable_reason()
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda name: None)
    monkeypatch.setattr(netns.os, "access", lambda path, mode: False)
    with pytest.raises(NetnsError, match="iproute2"):
        Network("ok").create()
    with pytest.raises(NetnsError, match="create\\(\\) the network"):
        Network("ok").add_host("a")
    cluster = LocalCluster(tmp_path / "run", netns=False)
    with pytest.raises(ClusterError, match="not in netns mode"):
        cluster.cut("computenode-1")
