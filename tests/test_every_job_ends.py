"""Every job ends and cmkill always works: syncs within one partition and onto one node, kills a node
never confirms, slots the head and a node disagree on, and why a waiting job waits."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import zmq

from cm.keys import secure_client
from cm.protocol import Ack, Heartbeat, Hello, JobStarted, RunJob, Welcome, decode, encode
from conftest import gone, wait_gone, wait_pids
from test_sync import make_tree, snapshot


def test_a_sync_inside_one_partition_copies_the_tree(make_cluster):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    src = cluster.data_dir / "gpu" / "bar"
    make_tree(src, big=2 << 20, small=50)
    job_id = cluster.submit("cmsync", "--wait", "gpu:/bar", "gpu:/bar-copy", timeout=60)
    job = cluster.job(job_id)
    assert job["state"] == "COMPLETED", job
    assert snapshot(cluster.data_dir / "gpu" / "bar-copy") == snapshot(src)
    # -n 2 inside one partition: each node sends one rank and receives one
    job_id = cluster.submit("cmsync", "-n", "2", "--wait", "gpu:/bar", "gpu:/bar-two", timeout=60)
    job = cluster.job(job_id)
    assert job["state"] == "COMPLETED" and sorted(job["nodes"]) == ["computenode-1"] * 2 + ["computenode-2"] * 2
    assert snapshot(cluster.data_dir / "gpu" / "bar-two") == snapshot(src)
    assert set(cluster.node_states().values()) == {"IDLE"}


def test_a_sync_from_a_node_onto_itself_copies_the_tree(make_cluster):
    cluster = make_cluster("cpu:1", nodes=1)
    src = cluster.data_dir / "cpu" / "a"
    make_tree(src, big=1 << 20, small=20)
    job_id = cluster.submit("cmsync", "--wait", "computenode-1:/a", "computenode-1:/b", timeout=60)
    assert cluster.job(job_id)["state"] == "COMPLETED"
    assert snapshot(cluster.data_dir / "cpu" / "b") == snapshot(src)


def test_a_destination_inside_its_source_is_refused_at_submit(make_cluster):
    cluster = make_cluster("gpu:1,cpu:1", nodes=2)
    for src, dst in (("gpu:/a", "gpu:/a/b"), ("gpu:/", "gpu:/x"), ("gpu:/a", "computenode-1:/a/b/c"),
                     ("gpu:/a", "gpu:/a")):
        proc = cluster.cli("cmsync", src, dst, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, (src, dst, proc)
        assert "inside SRC" in proc.stderr or "same directory" in proc.stderr, proc.stderr
    proc = cluster.cli("cmsync", "--delete", "gpu:/a/b", "gpu:/a", check=False)
    assert proc.returncode != 0 and "would delete the source" in proc.stderr
    assert cluster.info()["jobs"] == []
    # the same paths on other storage are fine
    cluster.submit("cmsync", "gpu:/a", "cpu:/a/b")
    cluster.submit("cmsync", "gpu:/ab", "gpu:/a")


def test_cmkill_ends_a_job_whose_node_never_confirms_and_drains_the_node(make_cluster):
    cluster = make_cluster("cpu:2", nodes=2, heartbeat_misses=200)  # the stopped node is not declared DOWN
    job_id = cluster.submit("cmrun", "-n", "2", "sleep", "600")
    cluster.wait_state(job_id, "RUNNING")
    cluster.procs["computenode-2"].send_signal(signal.SIGSTOP)
    try:
        assert "cancel" in cluster.cli("cmkill", str(job_id)).stdout
        job = cluster.wait_state(job_id, "CANCELLED", timeout=60)  # due after grace + confirmation: 4 s
        assert "kill not confirmed" in job["reason"]
        nodes = {n["name"]: n for n in cluster.info()["nodes"]}
        assert nodes["computenode-2"]["state"] == "DRAIN" and nodes["computenode-2"]["reason"] == "kill not confirmed"
        assert nodes["computenode-2"]["cpus_free"] == nodes["computenode-2"]["cpus"]
        assert nodes["computenode-1"]["state"] == "IDLE"
    finally:
        cluster.procs["computenode-2"].send_signal(signal.SIGCONT)


def test_cancelling_a_job_whose_node_is_not_answering_ends_it_at_once(make_cluster):
    # a job CANCELLED within the 60 s below waited neither for a kill confirmation nor for the node to be DOWN
    cluster = make_cluster("cpu:1", nodes=1, heartbeat_misses=1000, kill_confirm=600)  # DOWN after 200 s
    job_id = cluster.submit("cmrun", "sh", "-c", "echo $$ > pid; exec sleep 600")
    cluster.wait_state(job_id, "RUNNING")
    pid = wait_pids(cluster.home / "pid", 1)[0]
    try:
        cluster.kill("headnode", signal.SIGKILL)
        cluster.kill("computenode-1", signal.SIGKILL)
        cluster.start_head()
        cluster.wait_head()
        assert cluster.node_states()["computenode-1"] in ("UNKNOWN", "DOWN")
        cluster.cli("cmkill", str(job_id))
        job = cluster.wait_state(job_id, "CANCELLED", timeout=60)
        assert "not confirmed" not in (job.get("reason") or ""), job
        node = cluster.info()["nodes"][0]
        assert node["cpus_free"] == node["cpus"] and node["state"] in ("UNKNOWN", "DOWN"), node
    finally:
        os.kill(pid, signal.SIGKILL)  # the orphan of the killed daemon: no daemon is left to stop it


def test_a_node_that_never_calls_back_after_a_head_restart_is_down_after_the_timeout_and_told_to_stop(make_cluster):
    cluster = make_cluster("cpu:1", nodes=1, heartbeat_misses=40)  # 8 s
    timeout = 0.2 * 40
    job_id = cluster.submit("cmrun", "sh", "-c", "echo $$ > pid; exec sleep 600")
    cluster.wait_state(job_id, "RUNNING")
    pid = wait_pids(cluster.home / "pid", 1)[0]
    cluster.procs["computenode-1"].send_signal(signal.SIGSTOP)  # hung, or cut off: its job runs on
    try:
        cluster.kill("headnode", signal.SIGKILL)
        cluster.start_head()
        started = time.monotonic()
        cluster.wait_head()
        state = cluster.node_states()["computenode-1"]
        assert state == "UNKNOWN" or time.monotonic() - started >= timeout, state  # not DOWN before the timeout
        cluster.wait_node("computenode-1", "DOWN", timeout=60)
        assert time.monotonic() - started >= timeout  # never before the heartbeat timeout since the head started
        job = cluster.wait_state(job_id, ("NODE_FAIL", "COMPLETED", "FAILED", "CANCELLED"), timeout=30)
        assert job["state"] == "NODE_FAIL" and "stopped answering" in job["reason"], job
        assert not gone(pid)  # the node never heard of it
    finally:
        cluster.procs["computenode-1"].send_signal(signal.SIGCONT)
    wait_gone([pid], timeout=60)  # back: the head tells it to stop the job it no longer owns
    cluster.wait_node("computenode-1", "IDLE", timeout=30)
    assert cluster.job(job_id)["state"] == "NODE_FAIL"


def _abort_links(pid: int, port: int) -> list[str]:
    """Abort (``ss -K``) the TCP connections process ``pid`` holds to ``port``: the peer gets a RST, so the
    head's ROUTER forgets that node and what it sends the node meanwhile reaches no one. Returns them."""
    listed = subprocess.run(["ss", "-tnpH", "dport", "=", f":{port}"], capture_output=True, text=True, check=True).stdout
    mine = [line.split()[3].rsplit(":", 1)[1] for line in listed.splitlines() if f"pid={pid}," in line]
    assert mine, f"process {pid} holds no connection to port {port}:\n{listed}"
    for local in mine:
        subprocess.run(["ss", "-K", "-tn", "sport", "=", f":{local}", "dport", "=", f":{port}"],
                       capture_output=True, check=True)
    left = subprocess.run(["ss", "-tnpH", "dport", "=", f":{port}"], capture_output=True, text=True, check=True).stdout
    assert not [line for line in left.splitlines() if f"pid={pid}," in line and "ESTAB" in line], \
        f"ss -K left the connections of {pid} open (a kernel without CONFIG_INET_DIAG_DESTROY?):\n{left}"
    return mine


def test_a_job_cancelled_just_before_the_head_restarts_is_stopped_by_the_new_head(make_cluster):
    # the node is frozen and its link reset, so the KillJob of the cancel reaches no one; the head is killed
    # before anything confirms it: only the restarted head, sending the stop again after its reload, can stop it
    cluster = make_cluster("cpu:1", nodes=1, heartbeat_misses=1000, kill_confirm=600)  # neither DOWN nor expired
    job_id = cluster.submit("cmrun", "sh", "-c", "echo $$ > pid; exec sleep 600")
    cluster.wait_state(job_id, "RUNNING")
    pid = wait_pids(cluster.home / "pid", 1)[0]
    node = cluster.procs["computenode-1"]
    node.send_signal(signal.SIGSTOP)
    try:
        _abort_links(node.pid, cluster.head_port)
        assert "cancel" in cluster.cli("cmkill", str(job_id)).stdout
        assert cluster.job(job_id)["state"] not in ("CANCELLED", "COMPLETED") and not gone(pid)  # not confirmed
        cluster.kill("headnode", signal.SIGKILL)
        cluster.start_head()
        cluster.wait_head()
    finally:
        node.send_signal(signal.SIGCONT)
    wait_gone([pid], timeout=60)
    job = cluster.wait_state(job_id, ("CANCELLED", "COMPLETED", "FAILED", "NODE_FAIL", "TIMEOUT"), timeout=60)
    assert job["state"] == "CANCELLED" and "not confirmed" not in (job.get("reason") or ""), job
    cluster.wait_node("computenode-1", "IDLE", timeout=30)  # confirmed by the node: not drained


def _fake_node(cluster, name: str, partition: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.identity = name.encode()
    secure_client(sock, cluster.run_dir, name)
    sock.connect(f"tcp://127.0.0.1:{cluster.head_port}")
    sock.send(encode(Hello(node=name, partition=partition, cpus=2, mem_mb=1000, version="0", running=[],
                           transfer_addr="127.0.0.1:1", data_root="/", incarnation="fake")))
    assert sock.poll(5000) and isinstance(decode(sock.recv()), Welcome)
    return sock


def _replace_node(cluster, name: str, partition: str) -> zmq.Socket:
    """Kill node name's daemon; a fake node takes its name and key."""
    cluster.kill(name, signal.SIGKILL)
    cluster.wait_node(name, "DOWN", timeout=10)
    return _fake_node(cluster, name, partition)


def _next_run_job(node: zmq.Socket, deadline: float) -> tuple[RunJob, bytes]:
    """The next RunJob the fake node gets (acknowledged), and its bytes as they came."""
    while True:
        assert node.poll(max(0, int((deadline - time.monotonic()) * 1000)) + 1), "no RunJob"
        raw = node.recv()
        msg = decode(raw)
        if isinstance(msg, RunJob):
            node.send(encode(Ack(ref=msg.id)))
            return msg, raw


def _say_started(node: zmq.Socket, msg: RunJob) -> None:
    node.send(encode(JobStarted(job_id=msg.job_id, node=node.identity.decode(), run=msg.spec.run,
                                role=msg.spec.role, rank=msg.spec.rank)))


def test_a_share_the_node_does_not_run_ends_the_job_within_two_heartbeats(make_cluster):
    cluster = make_cluster("cpu:1", nodes=1)
    node = _replace_node(cluster, "computenode-1", "cpu")
    try:
        job_id = cluster.submit("cmrun", "sleep", "600")
        msg, _ = _next_run_job(node, time.monotonic() + 5)  # accept the job, say it started ... then never run it
        _say_started(node, msg)
        cluster.wait_state(job_id, "RUNNING", timeout=5)
        deadline = time.monotonic() + 60
        while cluster.job(job_id)["state"] == "RUNNING":  # heartbeats that name no share (and keep it UP)
            assert time.monotonic() < deadline, "still RUNNING"
            node.send(encode(Heartbeat(node="computenode-1", running=[], shares=[], ending=[])))
            time.sleep(0.2)
        job = cluster.job(job_id)
        assert job["state"] == "NODE_FAIL" and "not running its share" in job["reason"], job  # at a heartbeat
    finally:
        node.close()


def test_a_share_the_node_never_starts_ends_the_job_after_the_start_timeout(make_cluster):
    cluster = make_cluster("cpu:1", nodes=1)
    node = _replace_node(cluster, "computenode-1", "cpu")
    try:
        job_id = cluster.submit("cmrun", "sleep", "600")
        sent = time.monotonic()
        deadline = sent + 90  # the start timeout is grace + confirmation + 5 s: 9 s here
        while time.monotonic() < deadline:  # acknowledge every RunJob, never start, heartbeat with nothing
            if node.poll(200):
                msg = decode(node.recv())
                if isinstance(msg, RunJob):
                    node.send(encode(Ack(ref=msg.id)))
            node.send(encode(Heartbeat(node="computenode-1", running=[], shares=[], ending=[])))
            if cluster.job(job_id)["state"] == "NODE_FAIL":
                break
        job = cluster.job(job_id)
        assert job["state"] == "NODE_FAIL" and "did not start" in job["reason"], job
        assert time.monotonic() - sent > 8  # not before the start timeout
    finally:
        node.close()


def test_a_job_past_its_time_limit_that_no_node_ends_is_stopped_by_the_head(make_cluster):
    cluster = make_cluster("cpu:1", nodes=1)
    node = _replace_node(cluster, "computenode-1", "cpu")
    try:
        job_id = cluster.submit("cmrun", "-t", "0:02", "sleep", "600")
        msg, _ = _next_run_job(node, time.monotonic() + 5)
        _say_started(node, msg)  # ... and then it runs on for ever, as far as this node says
        share = (msg.job_id, msg.spec.run, msg.spec.role, msg.spec.rank)
        deadline = time.monotonic() + 90
        while cluster.job(job_id)["state"] in ("DISPATCHING", "RUNNING"):
            assert time.monotonic() < deadline, cluster.job(job_id)
            while node.poll(0):  # every KillJob acknowledged and ignored: only the head can end the job
                got = decode(node.recv())
                if hasattr(got, "id") and not isinstance(got, (Ack, Welcome)):
                    node.send(encode(Ack(ref=got.id)))
            node.send(encode(Heartbeat(node="computenode-1", running=[msg.job_id], shares=[share], ending=[])))
            time.sleep(0.2)
        job = cluster.job(job_id)
        assert job["state"] == "TIMEOUT" and "stopped by the head" in job["reason"], job
    finally:
        node.close()


def test_a_waiting_job_says_why(make_cluster):
    cluster = make_cluster("cpu:2", nodes=2)
    cpus = str(cluster.info()["nodes"][0]["cpus"])
    wide = cluster.submit("cmrun", "-n", "2", "-c", cpus, "sleep", "600")
    cluster.wait_state(wide, "RUNNING")
    waiting = cluster.submit("cmrun", "-n", "2", "-c", cpus, "-t", "10:00", "true")
    held = cluster.submit("cmrun", "--hold", "true")

    def reason(job_id: int, expected: str, timeout: float = 5) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = cluster.job(job_id)
            if job["reason"].split(";")[0] == expected or time.monotonic() > deadline:
                assert job["reason"].split(";")[0] == expected, job
                return job
            time.sleep(0.1)

    reason(waiting, "Resources")
    reason(held, "Held")
    small = cluster.submit("cmrun", "-t", "20:00", "true")  # would fit nowhere now, and must not jump ahead
    reason(small, "Resources")
    assert "Resources" in cluster.cli("cminfo").stdout  # the NODES column shows (reason), as squeue does
    cluster.cli("cmcontrol", "drain", "computenode-2")
    cluster.cli("cmkill", str(wide))
    reason(waiting, "ReqNodeNotAvail")
    cluster.cli("cmcontrol", "resume", "computenode-2")
    cluster.wait_state(waiting, "COMPLETED")


def test_shares_travel_as_tuples_and_malformed_ones_are_refused():
    import pytest

    from cm.protocol import KillJob, ProtocolError

    beat = decode(encode(Heartbeat(node="n", running=[3], shares=[(3, 1, "src", 0), (3, 1, "dst", 0)])))
    assert beat.shares == [(3, 1, "src", 0), (3, 1, "dst", 0)] and beat.ending == []
    kill = decode(encode(KillJob(job_id=3, state="CANCELLED", run=1, role="dst", rank=0)))
    assert (kill.run, kill.role, kill.rank) == (1, "dst", 0)
    for bad in ([(3, 1, "src")], [(3, "1", "src", 0)], [[3, 1, "src", 0, 9]], [3]):
        with pytest.raises(ProtocolError, match="shares"):
            decode(encode(Heartbeat(node="n", running=[], shares=bad)))


def test_the_scheduler_says_why_each_job_waits():
    from cm.head.policies import FirstFit
    from cm.head.resources import Demand, NodeView, Request, Running
    from cm.head.scheduler import Scheduler

    nodes = {n: NodeView(n, "p", 4, 1000) for n in ("a", "b")}
    nodes["b"].usable = False  # DOWN or drained
    nodes["a"].take(4, 0)
    running = [Running(9, 100.0, [("a", 4, 0)])]
    pending = [Request(1, 0, 1.0, 10, (Demand("run", 1, 2, 0, partition="p"),)),
               Request(2, 0, 2.0, 10, (Demand("run", 2, 1, 0, partition="p"),)),
               Request(3, 0, 3.0, 10, (Demand("src", 1, 1, 0, node="b"), Demand("dst", 1, 1, 0, node="a")))]
    scheduler = Scheduler(FirstFit())
    assert scheduler.plan(pending, nodes, running, 0.0) == []
    assert scheduler.reasons == {1: "Resources", 2: "ReqNodeNotAvail", 3: "ReqNodeNotAvail"}
    # node a: 1 CPU free until t=100. Job 1 (2 CPUs) waits for it; a 1-CPU job of 200 s would delay it,
    # one of 50 s would not (backfill)
    nodes["a"].give(1, 0)
    pending = [pending[0], Request(4, 0, 4.0, 200, (Demand("run", 1, 1, 0, partition="p"),)),
               Request(5, 0, 5.0, 50, (Demand("run", 1, 1, 0, partition="p"),))]
    running = [Running(9, 100.0, [("a", 3, 0)])]
    started = scheduler.plan(pending, nodes, running, 0.0)
    assert [r.job_id for r, _ in started] == [5]
    assert scheduler.reasons == {1: "Resources", 4: "Priority"}


def test_the_transport_a_sync_asks_for_reaches_the_node(make_cluster):
    """cmsync --transport tcp: the node's RunJob for the sender carries it, on the wire and decoded."""
    import msgpack

    cluster = make_cluster("cpu:1", nodes=1)
    node = _replace_node(cluster, "computenode-1", "cpu")
    try:
        job_id = cluster.submit("cmsync", "--transport", "tcp", "cpu:/a", "cpu:/b")
        deadline = time.monotonic() + 10
        receiver, _ = _next_run_job(node, deadline)
        assert receiver.spec.role == "dst"
        _say_started(node, receiver)  # the sender is sent once its receiver has started
        msg, raw = _next_run_job(node, deadline)
        assert msg.spec.role == "src" and msg.spec.transfer.transport == "tcp"
        assert msgpack.unpackb(raw)["spec"]["transfer"]["transport"] == "tcp"  # on the wire, not a default
    finally:
        node.close()
    cluster.cli("cmkill", str(job_id))


def test_a_stop_naming_an_earlier_run_leaves_the_nodes_current_run_alone(tmp_path):
    # a KillJob resent late, after a requeue or a sync restart put the job's next run on this node
    from cm import config
    from cm.node.agent import NodeAgent
    from cm.protocol import ANY_RANK, ANY_ROLE, ANY_RUN, ShareKey
    from cm.states import JobState

    agent = NodeAgent(config.load({}, run_dir=str(tmp_path), name="computenode-1"))
    stopped = []
    agent._stop_share = lambda share, state, reason: stopped.append(share)
    agent.purge.jobs = {ShareKey(7, 1, "", 0): None, ShareKey(7, 2, "", 0): None, ShareKey(8, 1, "", 0): None}
    agent.receiving = {ShareKey(7, 2, "dst", 0): "transfer"}
    agent.stop(ShareKey(7, 1, ANY_ROLE, ANY_RANK), JobState.CANCELLED, "late")
    assert stopped == [(7, 1, "", 0)]
    stopped.clear()
    agent.stop(ShareKey(7, ANY_RUN, ANY_ROLE, ANY_RANK), JobState.CANCELLED, "every run")  # whichever run is here
    assert sorted(stopped) == [(7, 1, "", 0), (7, 2, "", 0), (7, 2, "dst", 0)]
