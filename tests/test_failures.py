"""Bad input and dead daemons: errors are clear, nothing changes, nothing dies."""

from __future__ import annotations

import os
import signal
import socket
import time

import msgpack
import zmq
from conftest import node_dealer

from cm.protocol import VERSION, Heartbeat, Hello, encode


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


def test_a_restarted_compute_daemon_comes_back_and_takes_jobs(cluster):
    cluster.kill("computenode-4", signal.SIGKILL)
    cluster.wait_node("computenode-4", "DOWN", timeout=10)
    cluster.start_node("computenode-4", "cpu")
    cluster.wait_node("computenode-4", "IDLE", timeout=15)
    job_id = cluster.submit("cmrun", "--partition", "cpu", "-n", "2", "--wait", "true")
    assert cluster.job(job_id)["state"] == "COMPLETED"


def test_garbage_on_the_client_socket_leaves_the_head_answering(cluster):
    path = str(cluster.run_dir / "head.sock")
    for payload in (b"\x00\x00\x00\x05hello", b"GET / HTTP/1.1\r\n\r\n", b"\xff" * 64, os.urandom(4096),
                    (10).to_bytes(4, "big") + msgpack.packb({"v": 1, "t": "request"})[:10],
                    len(b := msgpack.packb({"v": 1, "t": "request", "id": "x", "op": "submit", "args": {"kind": 5}})
                        ).to_bytes(4, "big") + b):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(payload)
            try:
                s.recv(65536)
            except socket.timeout:
                pass
    # half a frame, then silence: the head must not wait for it
    stalled = socket.socket(socket.AF_UNIX)
    stalled.connect(path)
    stalled.sendall((1000).to_bytes(4, "big") + b"abc")
    assert len(cluster.info()["nodes"]) == 4
    stalled.close()
    assert cluster.info()["jobs"] == []


def test_malformed_messages_to_the_router_leave_the_head_answering(cluster):
    # raw TCP garbage never gets past the CurveZMQ handshake
    with socket.create_connection(("127.0.0.1", cluster.head_port), timeout=5) as s:
        s.sendall(os.urandom(2048))
    # an authenticated peer sending nonsense gets errors, and changes nothing
    dealer = node_dealer(cluster, "computenode-1")
    bad = [b"", b"\xc1", msgpack.packb({"v": VERSION, "t": "job_ended", "id": "x", "job_id": "one"}),
           msgpack.packb({"v": VERSION, "t": "run_job", "id": "y", "job_id": 1, "spec": {}}),
           encode(Heartbeat(node="computenode-2", running=[])),
           msgpack.packb({"v": VERSION, "t": "job_ended", "id": "z", "job_id": 123456, "node": "computenode-1", "run": 1,
                          "state": "COMPLETED", "exit_code": 0})]
    for payload in bad:
        dealer.send(payload)
    dealer.send_multipart([b"a", b"b", b"c"])
    time.sleep(0.5)
    dealer.close()
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
    assert info["jobs"] == []
    job_id = cluster.submit("cmrun", "--wait", "true")
    assert cluster.job(job_id)["state"] == "COMPLETED"


def test_a_head_killed_mid_run_loses_nothing_and_records_the_job_once(cluster):
    job_id = cluster.submit("cmrun", "-n", "2", "--partition", "cpu", "sh", "-c", "sleep 2; echo done >> finished")
    pending = cluster.submit("cmrun", "--partition", "gpu", "-c", str(os.cpu_count()), "-n", "2", "true")
    cluster.wait_state(job_id, "RUNNING")
    cluster.kill("headnode", signal.SIGKILL)
    time.sleep(2.5)  # the job ends while the head is away
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
