"""Bad input and dead daemons: errors are clear, nothing changes, nothing dies."""

from __future__ import annotations

import os
import random
import signal
import socket
import time

import msgpack
import zmq
from conftest import gone, node_dealer, wait_gone, wait_pids

from cm.protocol import VERSION, Error, ErrorCode, Heartbeat, Hello, Reply, decode, encode, unframe


def test_a_killed_compute_daemon_makes_its_node_down_and_its_job_node_fail(cluster):
    job_id = cluster.submit("cmrun", "--partition", "gpu", "-n", "2", "sleep", "30")
    job = cluster.wait_state(job_id, "RUNNING")
    victim = job["nodes"][1]
    cluster.kill(victim, signal.SIGKILL)
    cluster.wait_node(victim, "DOWN", timeout=10)
    job = cluster.wait_state(job_id, "NODE_FAIL", timeout=15)
    assert "stopped answering" in job["reason"]
    # the surviving node's share was stopped too and its CPUs are free again
    nodes = {n["name"]: n for n in cluster.info()["nodes"]}
    survivor = job["nodes"][0]
    deadline = time.monotonic() + 10
    while nodes[survivor]["cpus_free"] != nodes[survivor]["cpus"] and time.monotonic() < deadline:
        time.sleep(0.1)
        nodes = {n["name"]: n for n in cluster.info()["nodes"]}
    assert nodes[survivor]["cpus_free"] == nodes[survivor]["cpus"]


def test_a_requeued_job_runs_again_elsewhere_when_its_node_dies(cluster):
    job_id = cluster.submit("cmrun", "--partition", "gpu", "--requeue", "sh", "-c",
                            'echo $CM_NODENAME >> ran-on; sleep 3')
    job = cluster.wait_state(job_id, "RUNNING")
    first = job["nodes"][0]
    cluster.kill(first, signal.SIGKILL)
    job = cluster.wait_state(job_id, "COMPLETED", timeout=30)
    ran_on = (cluster.home / "ran-on").read_text().split()
    assert ran_on[0] == first and ran_on[-1] != first and job["nodes"] == [ran_on[-1]]


def test_a_restarted_compute_daemon_comes_back_and_takes_jobs(make_cluster):
    cluster = make_cluster(heartbeat_misses=300)  # 60 s: the restart, not a missed heartbeat, must tell the head
    job_id = cluster.submit("cmrun", "--partition", "cpu", "sh", "-c",
                            "sleep 300 & echo $! > child; echo $$ > leader; wait")
    job = cluster.wait_state(job_id, "RUNNING")
    node = job["nodes"][0]
    pids = wait_pids(cluster.home / "leader", 1) + wait_pids(cluster.home / "child", 1)
    cluster.kill(node, signal.SIGKILL)
    assert not any(gone(pid) for pid in pids)  # orphans now: nothing else stops them
    cluster.start_node(node, "cpu")  # at once: the head sees a new incarnation, not a node that went quiet
    job = cluster.wait_state(job_id, ("NODE_FAIL", "COMPLETED", "FAILED", "CANCELLED"), timeout=30)
    assert job["state"] == "NODE_FAIL" and "node daemon restarted" in job["reason"], job  # reported lost
    wait_gone(pids)  # the previous daemon's process group was killed
    assert f'"pgid": {pids[0]}' in cluster.logfile(node).read_text()  # by the new daemon, from its state file
    cluster.wait_node(node, "IDLE", timeout=15)
    job_id = cluster.submit("cmrun", "--partition", "cpu", "-n", "2", "--wait", "true")
    assert cluster.job(job_id)["state"] == "COMPLETED"


def _answers(s: socket.socket) -> tuple[list, bool]:
    """The messages the head sent on s, and whether it closed s (a silent open socket fails the test)."""
    buf, got = bytearray(), []
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return got, True
        buf += chunk
        while (body := unframe(buf)) is not None:
            got.append(decode(body))


def test_garbage_on_the_client_socket_leaves_the_head_answering(cluster):
    path = str(cluster.run_dir / "head.sock")
    garbage = [b"\x00\x00\x00\x05hello", b"GET / HTTP/1.1\r\n\r\n", b"\xff" * 64,
               b"\x7f" + random.Random(3).randbytes(4095),  # its header names a frame over the limit
               (10).to_bytes(4, "big") + msgpack.packb({"v": 1, "t": "request"})[:10]]
    misfit = msgpack.packb({"v": VERSION, "t": "submit", "id": "x", "job": {"kind": 5}})
    for payload in garbage:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(path)
            s.sendall(payload)
            got, closed = _answers(s)
        assert closed, payload[:40]
        assert len(got) == 1 and isinstance(got[0], Reply) and not got[0].ok, (payload[:40], got)
        assert got[0].error.startswith("bad request: "), (payload[:40], got[0])
    with socket.socket(socket.AF_UNIX) as s:  # a request whose field does not fit: answered, naming it
        s.settimeout(30)
        s.connect(path)
        s.sendall(len(misfit).to_bytes(4, "big") + misfit)
        buf = bytearray()
        while (body := unframe(buf)) is None:
            buf += s.recv(65536)
        answer = decode(body)
    assert isinstance(answer, Reply) and not answer.ok and "kind" in answer.error, answer
    assert "internal error" not in answer.error, answer
    # half a frame, then silence: the head must not wait for it
    stalled = socket.socket(socket.AF_UNIX)
    stalled.connect(path)
    stalled.sendall((1000).to_bytes(4, "big") + b"abc")
    assert len(cluster.info()["nodes"]) == 4
    stalled.close()
    assert cluster.info()["jobs"] == []
    cluster.assert_daemons_alive()


def test_malformed_messages_to_the_router_leave_the_head_answering(cluster):
    # raw TCP garbage never gets past the CurveZMQ handshake
    with socket.create_connection(("127.0.0.1", cluster.head_port), timeout=5) as s:
        s.sendall(os.urandom(2048))
    # an authenticated peer sending nonsense gets an error for each message, and changes nothing: a node of its
    # own key (a name no daemon runs, so no live node's route is taken over)
    from cm.keys import ensure_keys

    ensure_keys(cluster.run_dir, ["computenode-9"])
    deadline = time.monotonic() + 60
    while True:  # the head reads keys/authorized again on its next tick: until then the key is refused
        dealer = node_dealer(cluster, "computenode-9")
        dealer.send(b"")
        if dealer.poll(2_000):
            dealer.recv()
            break
        dealer.close()
        assert time.monotonic() < deadline, "the head never took the new node key"
    bad = {"empty": b"", "not msgpack": b"\xc1",
           "a field of the wrong type": msgpack.packb({"v": VERSION, "t": "job_ended", "id": "x", "job_id": "one"}),
           "a head-to-node message": msgpack.packb({"v": VERSION, "t": "run_job", "id": "y", "job_id": 1,
                                                    "spec": {}}),
           "mis-addressed": encode(Heartbeat(node="computenode-2", running=[])),
           "from a node that never said hello": msgpack.packb({
               "v": VERSION, "t": "job_ended", "id": "z", "job_id": 123456, "node": "computenode-9", "run": 1,
               "state": "COMPLETED", "exit_code": 0})}
    answers = {}
    for what, payload in bad.items():
        dealer.send(payload)
        assert dealer.poll(30_000), f"no answer to {what}"
        answers[what] = decode(dealer.recv())
    dealer.send_multipart([b"a", b"b", b"c"])  # wrong framing: dropped (and logged)
    dealer.close()
    for what, answer in answers.items():
        assert isinstance(answer, Error) and answer.message, (what, answer)
    assert "does not match routing id" in answers["mis-addressed"].message, answers["mis-addressed"]
    assert answers["from a node that never said hello"].code == ErrorCode.UNKNOWN_NODE
    assert {a.code for w, a in answers.items() if w not in ("mis-addressed", "from a node that never said hello")} \
        == {ErrorCode.BAD_MESSAGE}, answers
    # an unknown key is refused outright
    stranger = zmq.Context.instance().socket(zmq.DEALER)
    stranger.linger = 0
    public, secret = zmq.curve_keypair()
    stranger.curve_publickey, stranger.curve_secretkey = public, secret
    stranger.curve_serverkey = open(cluster.run_dir / "keys" / "head.key").read().split('public-key = "')[1].split('"')[0].encode()
    stranger.identity = b"intruder"
    stranger.connect(f"tcp://127.0.0.1:{cluster.head_port}")
    stranger.send(encode(Hello(node="intruder", partition="cpu", cpus=64, mem_mb=1000, version="0", running=[],
                               transfer_addr="x:1", data_root="/", incarnation="i")))
    assert stranger.poll(1000) == 0  # no Welcome: the handshake itself was refused
    stranger.close()
    info = cluster.info()
    assert "intruder" not in {n["name"] for n in info["nodes"]}
    assert "computenode-9" not in {n["name"] for n in info["nodes"]}
    assert info["jobs"] == []
    assert cluster.node_states()["computenode-2"] in ("IDLE", "MIXED", "ALLOCATED")
    job_id = cluster.submit("cmrun", "--wait", "true")
    assert cluster.job(job_id)["state"] == "COMPLETED"
    cluster.assert_daemons_alive()


def test_a_head_killed_mid_run_loses_nothing_and_records_the_job_once(cluster):
    cpus = max(n["cpus"] for n in cluster.info()["nodes"])
    job_id = cluster.submit("cmrun", "-n", "2", "--partition", "cpu", "-c", str(cpus), "sh", "-c",
                            "echo $$ >> pids; while [ ! -e go ]; do sleep 0.05; done; echo done >> finished")
    pending = cluster.submit("cmrun", "--partition", "cpu", "-c", str(cpus), "-n", "2", "true")  # waits for it
    cluster.wait_state(job_id, "RUNNING")
    pids = wait_pids(cluster.home / "pids", 2)
    assert cluster.job(pending)["state"] == "PENDING"
    cluster.kill("headnode", signal.SIGKILL)
    (cluster.home / "go").write_text("")
    wait_gone(pids)  # the job ended while the head was away: only the nodes' outboxes hold its end
    cluster.start_head()
    cluster.wait_head()
    job = cluster.wait_state(job_id, "COMPLETED", timeout=30)
    assert job["exit_code"] == 0
    assert (cluster.home / "finished").read_text() == "done\ndone\n"  # each rank ran once
    cluster.wait_state(pending, "COMPLETED", timeout=30)
    ids = [j["id"] for j in cluster.info("--all")["jobs"]]
    assert sorted(ids) == sorted({job_id, pending})
    # ids keep rising after the restart
    assert cluster.submit("cmrun", "true") > pending


def test_a_database_outage_is_waited_out_and_nothing_is_lost(make_cluster, tmp_path):
    from cm.cluster.db import DatabaseServer, server_plan

    server = DatabaseServer(server_plan())  # a server of its own, even when MONGODB_URI names a shared one
    uri = server.start(tmp_path / "db", log_path=tmp_path / "db.log")
    try:
        cluster = make_cluster("cpu:2", nodes=2, mongodb_uri=uri)
        job_id = cluster.submit("cmrun", "sh", "-c", "sleep 3; echo done > finished")
        cluster.wait_state(job_id, "RUNNING")
        server.stop()
        # within a heartbeat of the driver's monitor, cminfo says so; never a hang or a traceback
        deadline = time.monotonic() + 3
        while True:
            t = time.monotonic()
            proc = cluster.cli("cminfo", check=False)
            assert time.monotonic() - t < 5 and "Traceback" not in proc.stderr
            if proc.returncode != 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert proc.returncode != 0 and "database is unreachable" in proc.stderr
        time.sleep(10)  # the job ends while the database is away
        assert (cluster.home / "finished").exists()
        server.start(tmp_path / "db", log_path=tmp_path / "db.log")  # the same socket: the same URI
        job = cluster.wait_state(job_id, "COMPLETED", timeout=30)
        assert job["exit_code"] == 0
        assert set(cluster.node_states().values()) == {"IDLE"}
        again = cluster.submit("cmrun", "--wait", "true")
        assert cluster.job(again)["state"] == "COMPLETED"
    finally:
        server.stop()


def test_a_restarted_daemon_is_never_sent_the_run_it_lost(make_cluster):
    """A daemon that dies after receiving RunJob, before saying JobStarted, must not get it again."""
    from cm.protocol import RunJob, Welcome, decode

    cluster = make_cluster("cpu:1", nodes=1)
    cluster.kill("computenode-1", signal.SIGKILL)  # a fake node takes its name and key
    cluster.wait_node("computenode-1", "DOWN", timeout=10)

    def incarnation(name: str) -> zmq.Socket:
        sock = node_dealer(cluster, "computenode-1")
        sock.send(encode(Hello(node="computenode-1", partition="cpu", cpus=2, mem_mb=1000, version="0", running=[],
                               transfer_addr="127.0.0.1:1", data_root="/", incarnation=name)))
        assert sock.poll(5000) and isinstance(decode(sock.recv()), Welcome)
        return sock

    def run_jobs(sock: zmq.Socket, seconds: float) -> list[int]:
        seen, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if sock.poll(int(left * 1000)):
                msg = decode(sock.recv())
                if isinstance(msg, RunJob):
                    seen.append(msg.job_id)
            else:
                break
        return seen

    first = incarnation("first")
    job_id = cluster.submit("cmrun", "true")
    assert job_id in run_jobs(first, 3)  # received, never answered: the daemon "dies" here
    first.close()
    second = incarnation("second")  # same name, new daemon
    cluster.wait_state(job_id, "NODE_FAIL", timeout=10)  # its share is lost (silent, then a new incarnation)
    assert job_id not in run_jobs(second, 2.5)  # several resend periods (CM_DISPATCH_RETRY=0.5)
    second.close()


def test_a_job_that_ends_while_the_head_is_down_is_timed_by_its_nodes_not_by_the_heads_return(cluster):
    job_id = cluster.submit("cmrun", "-n", "2", "--partition", "cpu", "sh", "-c", "sleep 1; echo done >> finished")
    cluster.wait_state(job_id, "RUNNING")
    cluster.kill("headnode", signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not ((cluster.home / "finished").exists() and (cluster.home / "finished").read_text() == "done\ndone\n"):
        assert time.monotonic() < deadline, "the job did not end while the head was down"
        time.sleep(0.1)
    time.sleep(2.0)  # the head stays away a while after the job ended: its downtime is not the job's
    back = time.time()
    cluster.start_head()
    cluster.wait_head()
    job = cluster.wait_state(job_id, "COMPLETED", timeout=30)
    started, ended = job["times"]["started"], job["times"]["ended"]
    assert started < ended <= back, (started, ended, back)  # when its nodes say it ended, before the head was back
    assert job["elapsed"] == ended - started
