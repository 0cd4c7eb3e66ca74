"""The intercom: a job's processes exchange keys and commands across nodes, through the real daemons.

Jobs here are small Python scripts run by the cluster as real processes; they write what they saw
to files in the job's working directory, and the tests read those.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cm.intercom import parse_condition, rank_of, select
from conftest import run_as

PY = sys.executable
CMINTERCOM = str(Path(sys.executable).parent / "cmintercom")


def script(cluster, name: str, body: str) -> str:
    path = cluster.home / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def wait_file(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear in {timeout} s")


def outputs(cluster, job_id: int) -> str:
    logs = cluster.home / "cmlogs" / str(job_id)
    return "\n".join(f"{p}:\n{p.read_text()}" for p in sorted(logs.rglob("*")) if p.is_file())


def finish(cluster, job_id: int, timeout: float = 60) -> dict:
    job = cluster.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout)
    assert job["state"] == "COMPLETED", f"job {job_id} {job['state']}: {job.get('reason')}\n{outputs(cluster, job_id)}"
    return job


# --- conditions (pure) -----------------------------------------------------------


def test_conditions_select_processes_by_rank_node_or_pattern_and_leave_the_sender_out():
    nodes = ["computenode-1", "computenode-2"]
    assert select("", nodes, 2, me=0) == [1, 2, 3]
    assert select("rank==1", nodes, 2, me=0) == [1]
    assert select(" rank == 3 ", nodes, 2) == [3]
    assert select("rank==99", nodes, 2) == []
    assert select("node==computenode-2", nodes, 2, me=2) == [3]
    assert select("re:^computenode-1/", nodes, 2) == [0, 1]
    assert select("re:/[02]$", nodes, 2) == [0, 2]
    assert parse_condition("node==a")("a", 5) and not parse_condition("node==a")("ab", 5)


@pytest.mark.parametrize("bad", ["rank==x", "rank=1", "node==", "host==a", "re:(", "everyone"])
def test_a_condition_that_is_not_valid_is_refused_with_its_text(bad):
    with pytest.raises(ValueError, match="condition|pattern"):
        parse_condition(bad)


def test_a_sender_path_names_one_process_of_the_job():
    nodes = ["n1", "n2"]
    assert rank_of("n2/3", nodes, 2) == 3
    for bad in ("n1/3", "n2/4", "n2/x", "3", "n2/-1"):
        with pytest.raises(ValueError):
            rank_of(bad, nodes, 2)


# --- a job's processes on two nodes ------------------------------------------------

EXCHANGE = """
    import json, os, sys, time
    from cm import intercom

    rank = int(os.environ["CM_PROC_RANK"])
    out = {"node": os.environ["CM_NODENAME"]}
    if rank == 0:
        out["config_version"] = intercom.put("config", "alpha=1")
    elif rank == 3:
        time.sleep(2)  # a late joiner: the put happened before it asked
    out["config"] = intercom.get("config", timeout=30)
    if rank == 2:
        pushed = []
        intercom.subscribe(lambda key, value, version: pushed.append([key, value, version]))
    intercom.fence(timeout=30)
    intercom.put(f"result/{rank}", f"{rank} saw {out['config']}")
    intercom.fence(timeout=30)
    if rank == 2:
        deadline = time.monotonic() + 10
        while len(pushed) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        out["pushed"] = sorted(pushed)
    if rank == 0:
        out["results"] = [intercom.get(f"result/{r}", timeout=5) for r in range(4)]
        out["to_rank_1"] = intercom.send("ping", to="rank==1")
        out["reply"] = intercom.recv(timeout=30)
        out["broadcast"] = intercom.send("bye")
        try:
            intercom.send("lost", to="rank==99")
        except intercom.IntercomError as exc:
            out["nobody"] = str(exc)
        out["replaced"] = intercom.put("config", "alpha=2")
    else:
        got = [intercom.recv(timeout=30)]
        if rank == 1:
            intercom.reply(got[0][1], "pong")
            got.append(intercom.recv(timeout=30))
        try:
            got.append(intercom.recv(timeout=0.5))
        except intercom.Timeout:
            pass
        out["got"] = got
    json.dump(out, open(f"out.{rank}.json", "w"))
"""


def test_processes_on_two_nodes_share_keys_fence_and_exchange_commands(cluster):
    path = script(cluster, "exchange.py", EXCHANGE)
    job_id = cluster.submit("cmrun", "--partition", "gpu", "-n", "2", "-p", "2", PY, path)
    job = finish(cluster, job_id)
    out = {r: json.loads((cluster.home / f"out.{r}.json").read_text()) for r in range(4)}
    first, second = job["nodes"]
    assert [out[r]["node"] for r in range(4)] == [first, first, second, second]
    # the configuration reached everyone, the late joiner too
    assert out[0]["config_version"] == 1 and all(out[r]["config"] == "alpha=1" for r in range(4))
    # after the fence every result is there for rank 0
    assert out[0]["results"] == [f"{r} saw alpha=1" for r in range(4)]
    # a subscriber was pushed every put made after it subscribed (and none from before)
    assert out[2]["pushed"] == [[f"result/{r}", f"{r} saw alpha=1", 1] for r in range(4)]
    # rank==1 reached rank 1 only; its reply came back to rank 0 with its sender
    assert out[0]["to_rank_1"] == 1
    assert out[1]["got"] == [["ping", f"{first}/0"], ["bye", f"{first}/0"]]
    assert out[0]["reply"] == ["pong", f"{first}/1"]
    # the broadcast reached the three others (not the sender), each once
    assert out[0]["broadcast"] == 3
    assert out[2]["got"] == [["bye", f"{first}/0"]] and out[3]["got"] == [["bye", f"{first}/0"]]
    # a send that matches nobody is an error, not silence
    assert "no process of this job matches" in out[0]["nobody"] and "rank==99" in out[0]["nobody"]
    assert out[0]["replaced"] == 2
    # the keys go with the job
    deadline = time.monotonic() + 10
    while stored_keys(cluster, job_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stored_keys(cluster, job_id) == []


def stored_keys(cluster, job_id: int) -> list:
    import pymongo

    client = pymongo.MongoClient(cluster.mongodb_uri, serverSelectionTimeoutMS=5000)
    try:
        return list(client[cluster.env["CM_DB_NAME"]]["intercom_keys"].find({"job_id": job_id}))
    finally:
        client.close()


def test_another_job_can_neither_read_the_keys_nor_speak_on_the_socket_of_a_job(cluster):
    owner = script(cluster, "owner.py", """
        import os, time
        from cm import intercom
        intercom.put("secret", "s3cret")
        open("owner.sock", "w").write(os.environ["CM_INTERCOM"])
        time.sleep(60)
    """)
    prying = script(cluster, "prying.py", """
        import json, os
        from cm import intercom
        out = {}
        try:
            out["own"] = intercom.get("secret", timeout=1)
        except intercom.Timeout:
            out["own"] = "timeout"
        try:
            intercom.Intercom(open("owner.sock").read()).get("secret", timeout=1)
            out["other"] = "read it"
        except intercom.IntercomError as exc:
            out["other"] = str(exc)
        json.dump(out, open("prying.json", "w"))
    """)
    owner_id = cluster.submit("cmrun", "--partition", "cpu", PY, owner)
    wait_file(cluster.home / "owner.sock")
    prying_id = cluster.submit("cmrun", "--partition", "cpu", PY, prying)
    finish(cluster, prying_id)
    out = json.loads((cluster.home / "prying.json").read_text())
    assert out["own"] == "timeout"  # the keys of another job are not in this one's
    assert "not one of job" in out["other"]  # nor may it speak on the other job's socket
    cluster.cli("cmkill", str(owner_id))
    cluster.wait_state(owner_id, "CANCELLED")
    assert not Path(wait_file(cluster.home / "owner.sock")).exists()  # the socket goes with the job


def test_a_get_survives_the_head_being_killed_and_restarted_between_put_and_get(cluster):
    path = script(cluster, "restart.py", """
        import json, os, time
        from cm import intercom
        rank = int(os.environ["CM_PROC_RANK"])
        if rank == 0:
            intercom.put("before", "put before the restart")
            open("put-done", "w").write("yes")
            while not os.path.exists("go"):
                time.sleep(0.05)
            intercom.put("after", "put after the restart")
        else:
            while not os.path.exists("put-done"):
                time.sleep(0.05)
            late = intercom.get("after", timeout=60)  # waits across the restart
            early = intercom.get("before", timeout=30)  # from the database
            json.dump([early, late], open("restart.json", "w"))
    """)
    job_id = cluster.submit("cmrun", "--partition", "cpu", "-n", "2", PY, path)
    wait_file(cluster.home / "put-done")
    time.sleep(0.5)  # rank 1's get of "after" is waiting
    cluster.kill("headnode", signal.SIGKILL)
    (cluster.home / "go").write_text("go")  # rank 0's put waits for the head
    time.sleep(1)
    cluster.start_head()
    cluster.wait_head()
    finish(cluster, job_id, timeout=60)
    assert json.loads((cluster.home / "restart.json").read_text()) == ["put before the restart",
                                                                        "put after the restart"]


def test_a_get_whose_node_comes_back_after_the_put_is_asked_again_and_answered(make_cluster):
    # the put's update is sent while the getter's node is away (frozen over the head's restart), so it
    # is lost: only the node asking again, once the new head welcomes it, answers the get
    cluster = make_cluster("cpu:2", nodes=2, heartbeat_misses=300)  # the frozen node is not DOWN meanwhile
    path = script(cluster, "late.py", """
        import json, os, time
        from cm import intercom
        rank = int(os.environ["CM_PROC_RANK"])
        if rank == 0:
            while not os.path.exists("go"):
                time.sleep(0.05)
            intercom.put("late", "put while the getter's node was away")
        else:
            open("getter", "w").write(os.environ["CM_NODENAME"])
            json.dump(intercom.get("late", timeout=120), open("late.json", "w"))
    """)
    job_id = cluster.submit("cmrun", "--partition", "cpu", "-n", "2", PY, path)
    getter = cluster.procs[wait_file(cluster.home / "getter")]
    time.sleep(0.5)  # rank 1's get is waiting (the head answered that the key is absent)
    getter.send_signal(signal.SIGSTOP)
    try:
        cluster.kill("headnode", signal.SIGKILL)
        cluster.start_head()
        cluster.wait_head()
        (cluster.home / "go").write_text("go")
        deadline = time.monotonic() + 30
        while not [k for k in stored_keys(cluster, job_id) if k.get("key") == "late"]:
            assert time.monotonic() < deadline, "the put was not stored"
            time.sleep(0.1)
    finally:
        getter.send_signal(signal.SIGCONT)
    assert json.loads(wait_file(cluster.home / "late.json", timeout=60)) == "put while the getter's node was away"
    finish(cluster, job_id, timeout=60)


def test_a_send_in_flight_when_the_head_is_replaced_fails_as_not_known_to_be_delivered(cluster):
    # a command is not idempotent: the node does not send it again to a new head (it might run twice),
    # the caller is told it may or may not have been delivered
    path = script(cluster, "inflight.py", """
        import os, time
        from cm import intercom
        rank = int(os.environ["CM_PROC_RANK"])
        if rank == 0:
            open("ready", "w").write("yes")
            while not os.path.exists("go"):
                time.sleep(0.05)
            open("sending", "w").write("yes")
            try:
                outcome = f"delivered to {intercom.send('hello', to='rank==1')}"
            except intercom.IntercomError as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            open("outcome", "w").write(outcome)
        else:
            while not os.path.exists("outcome"):
                time.sleep(0.05)
    """)
    job_id = cluster.submit("cmrun", "--partition", "cpu", "-n", "2", PY, path)
    wait_file(cluster.home / "ready")
    cluster.kill("headnode", signal.SIGKILL)
    (cluster.home / "go").write_text("go")  # rank 0's send reaches its node, which waits for the head
    wait_file(cluster.home / "sending")  # the head takes seconds to start again: the node holds the send by then
    cluster.start_head()
    cluster.wait_head()
    outcome = wait_file(cluster.home / "outcome", timeout=60)
    assert "the link to the head was renewed: not known whether the command was delivered" in outcome, outcome
    finish(cluster, job_id, timeout=60)


GARBAGE = """
    import json, os, random, socket, struct
    import msgpack
    from cm import intercom
    path = os.environ["CM_INTERCOM"]
    noise = b"\\x7f" + random.Random(7).randbytes(4095)  # its header names a frame far over the limit
    frames = [b"\\x00\\x00\\x00\\x05hello", b"\\xff" * 64, struct.pack(">I", 1 << 30) + b"x",
              struct.pack(">I", 3) + b"\\x93\\x01\\x02", noise,
              (lambda b: struct.pack(">I", len(b)) + b)(msgpack.packb({"t": "put", "req": "x", "key": 5})),
              (lambda b: struct.pack(">I", len(b)) + b)(msgpack.packb({"t": "nope", "req": 1}))]
    seen = []  # per frame: did the node close the connection, and the frames it answered with
    for f in frames:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        s.connect(path)
        s.sendall(f)
        data, closed = b"", False
        try:
            while chunk := s.recv(4096):
                data += chunk
            closed = True
        except socket.timeout:
            pass
        s.close()
        answers = []
        while len(data) >= 4 and len(data) >= 4 + int.from_bytes(data[:4], "big"):
            size = int.from_bytes(data[:4], "big")
            answers.append(msgpack.unpackb(data[4:4 + size]))
            data = data[4 + size:]
        seen.append({"closed": closed, "answers": answers, "rest": len(data)})
        if not closed:
            break  # the test says which frame was left open
    half = socket.socket(socket.AF_UNIX)
    half.connect(path)
    half.sendall(struct.pack(">I", 1000) + b"abc")  # half a frame, then silence
    try:
        intercom.put("", "no key")  # a request that does not fit: refused, its connection stays
        empty = "taken"
    except intercom.IntercomError as exc:
        empty = str(exc)
    intercom.put("still", "works")
    json.dump({"seen": seen, "empty": empty, "still": intercom.get("still", timeout=10)},
              open("garbage.json", "w"))
"""


def test_garbage_on_a_jobs_intercom_socket_closes_that_connection_only(cluster):
    path = script(cluster, "garbage.py", GARBAGE)
    job_id = cluster.submit("cmrun", "--partition", "gpu", PY, path)
    job = finish(cluster, job_id)
    out = json.loads((cluster.home / "garbage.json").read_text())
    for number, seen in enumerate(out["seen"]):
        assert seen["closed"], f"frame {number}: the node did not close the connection: {seen}"
        assert seen["rest"] == 0 and len(seen["answers"]) == 2, f"frame {number}: {seen}"
        welcome, failed = seen["answers"]
        assert (welcome["t"], welcome["req"]) == ("done", 0), f"frame {number}: {welcome}"  # taken on connect
        assert failed["t"] == "failed" and failed["req"] == 0 and failed["message"], f"frame {number}: {failed}"
        assert failed["code"] == "bad_message", f"frame {number}: {failed}"
    assert len(out["seen"]) == 7
    assert out["still"] == "works"  # the job's own connection goes on
    assert "request field 'key'" in out["empty"], out["empty"]
    node = job["nodes"][0]
    assert cluster.procs[node].poll() is None  # the node daemon lives on
    again = cluster.submit("cmrun", "--partition", "gpu", "--wait", "true")
    assert cluster.job(again)["state"] == "COMPLETED"


def test_a_process_outside_the_job_is_refused_even_as_the_same_user(cluster):
    path = script(cluster, "hold.py", """
        import os, time
        open("hold.sock", "w").write(os.environ["CM_INTERCOM"])
        time.sleep(60)
    """)
    job_id = cluster.submit("cmrun", "--partition", "gpu", PY, path)
    sock_path = wait_file(cluster.home / "hold.sock")
    from cm.intercom import Intercom, IntercomError

    with pytest.raises(IntercomError, match="not one of job"):
        Intercom(sock_path).put("k", "v")
    cluster.cli("cmkill", str(job_id))


USER = "cmt_icother"


@pytest.fixture
def other_user():
    """A real user of its own (made with useradd, removed after the test unless it was there before)."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to make a user")
    existed = subprocess.run(["id", USER], capture_output=True).returncode == 0
    if not existed and subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", USER],
                                      capture_output=True).returncode != 0:
        pytest.skip(f"useradd {USER} failed")
    yield pwd.getpwnam(USER)
    if not existed:
        subprocess.run(["userdel", USER], capture_output=True)


def test_another_user_cannot_connect_to_a_jobs_intercom_socket(cluster, other_user):
    path = script(cluster, "hold.py", """
        import os, time
        open("hold.sock", "w").write(os.environ["CM_INTERCOM"])
        time.sleep(60)
    """)
    job_id = cluster.submit("cmrun", "--partition", "gpu", PY, path)
    sock_path = wait_file(cluster.home / "hold.sock")
    directory = Path(sock_path).parent
    assert directory.stat().st_mode & 0o777 == 0o700 and directory.stat().st_uid == os.geteuid()

    def connect():
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(sock_path)
            return "connected"
        except OSError as exc:
            return exc.__class__.__name__
        finally:
            s.close()

    assert run_as(other_user.pw_uid, other_user.pw_gid, connect) == "PermissionError"
    cluster.cli("cmkill", str(job_id))


def test_cmintercom_in_a_shell_job_exits_124_on_timeout_and_1_on_error(cluster):
    path = script(cluster, "shell.sh", f"""
        ic={CMINTERCOM}
        if [ "$CM_PROC_RANK" = 0 ]; then
            $ic get never --timeout 0.5 > /dev/null 2> timeout.err; echo $? > rc.timeout
            $ic send lost --to 'rank==99' 2> error.err; echo $? > rc.error
            $ic fence --timeout 30
            $ic send ping --to 'rank==1' --wait-reply 30 > send.out; echo $? > rc.send
            $ic put shared 'a value'; $ic get shared > get.out; echo $? > rc.get
        else
            $ic fence --timeout 30
            $ic recv --timeout 30 > recv.out
            read sender command < recv.out
            $ic reply "$sender" "pong to $command"
        fi
    """)
    job_id = cluster.submit("cmrun", "--partition", "cpu", "-n", "2", "sh", path)
    job = finish(cluster, job_id)
    home = cluster.home
    assert (home / "rc.timeout").read_text().strip() == "124" and "timed out" in (home / "timeout.err").read_text()
    assert (home / "rc.error").read_text().strip() == "1" and "rank==99" in (home / "error.err").read_text()
    first, second = job["nodes"]
    assert (home / "recv.out").read_text() == f"{first}/0 ping\n"
    assert (home / "send.out").read_text() == f"1\n{second}/1 pong to ping\n"
    assert (home / "rc.send").read_text().strip() == "0"
    assert (home / "get.out").read_text() == "a value\n" and (home / "rc.get").read_text().strip() == "0"


def test_a_reply_that_comes_before_the_sender_waits_is_not_lost_and_limits_are_clear(make_cluster):
    cluster = make_cluster(intercom_value_bytes=1000, intercom_keys=3, intercom_queue=2)
    path = script(cluster, "early.py", """
        import json, os, time
        from cm import intercom
        rank = int(os.environ["CM_PROC_RANK"])
        out = {}
        if rank == 0:
            ic = intercom.Intercom()
            ic.send("ping", to="rank==1")
            time.sleep(2)  # the reply arrives meanwhile
            out["reply"] = ic.recv(timeout=10, replies=True)
            for name, call in [("value", lambda: intercom.put("big", "x" * 1001)),
                               ("keys", lambda: [intercom.put(f"k{i}", "v") for i in range(4)])]:
                try:
                    call()
                except intercom.LimitExceeded as exc:
                    out[name] = str(exc)
            out["queued"] = [intercom.send(f"c{i}", to="rank==1") for i in range(2)]
            try:
                intercom.send("c2", to="rank==1")  # rank 1 never reads: its queue is full
            except intercom.LimitExceeded as exc:
                out["queue"] = str(exc)
            intercom.fence(timeout=30)
        else:
            command, sender = intercom.recv(timeout=10)
            intercom.reply(sender, "pong")
            intercom.fence(timeout=30)  # reads nothing more meanwhile
        json.dump(out, open(f"early.{rank}.json", "w"))
    """)
    job_id = cluster.submit("cmrun", "--partition", "gpu", "-n", "2", PY, path)
    job = finish(cluster, job_id)
    out = json.loads((cluster.home / "early.0.json").read_text())
    assert out["reply"] == ["pong", f"{job['nodes'][1]}/1"]
    assert "1001 bytes" in out["value"] and "CM_INTERCOM_VALUE_BYTES" in out["value"]
    assert "CM_INTERCOM_KEYS" in out["keys"]
    assert out["queued"] == [1, 1]
    assert "reached nobody" in out["queue"] and "CM_INTERCOM_QUEUE" in out["queue"]


def test_outside_a_job_the_intercom_says_it_is_not_connected(monkeypatch):
    from cm import intercom

    monkeypatch.delenv("CM_INTERCOM", raising=False)
    monkeypatch.setattr(intercom, "_default", None)
    with pytest.raises(intercom.NotConnected, match="CM_INTERCOM"):
        intercom.put("k", "v")
    proc = subprocess.run([CMINTERCOM, "get", "k"], capture_output=True, text=True, env={
        k: v for k, v in os.environ.items() if k != "CM_INTERCOM"})
    assert proc.returncode == 1 and "CM_INTERCOM" in proc.stderr


def test_the_head_refuses_a_node_speaking_for_a_rank_or_job_it_does_not_hold(cluster):
    import zmq
    from conftest import node_dealer

    from cm.protocol import ErrorCode, IntercomAnswer, IntercomGet, IntercomPut, decode, encode

    job_id = cluster.submit("cmrun", "--partition", "gpu", "sleep", "30")
    holder = cluster.wait_state(job_id, "RUNNING")["nodes"][0]
    other = "computenode-3"  # a cpu node: it holds no rank of this job
    dealer = node_dealer(cluster, other)
    try:
        asks = {
            "rank of another node": IntercomPut(node=other, job_id=job_id, run=1, rank=0, key="k", value="v"),
            "a rank out of range": IntercomGet(node=other, job_id=job_id, run=1, rank=7, key="k"),
            "another run": IntercomGet(node=other, job_id=job_id, run=2, rank=0, key="k"),
            "no such job": IntercomGet(node=other, job_id=999999, run=1, rank=0, key="k"),
            "a node name that is not its own": IntercomGet(node=holder, job_id=job_id, run=1, rank=0, key="k"),
        }
        for msg in asks.values():
            dealer.send(encode(msg))
        answers = {}
        deadline = time.monotonic() + 10
        while len(answers) < 4 and time.monotonic() < deadline:
            if dealer.poll(500, zmq.POLLIN):
                reply = decode(dealer.recv())
                if isinstance(reply, IntercomAnswer):
                    answers[reply.ref] = reply
        got = {name: answers.get(msg.id) for name, msg in asks.items()}
        assert "does not hold rank 0" in got["rank of another node"].error
        assert got["rank of another node"].code is ErrorCode.FORBIDDEN
        assert "does not hold rank 7" in got["a rank out of range"].error
        assert got["another run"].code is ErrorCode.ENDED and got["no such job"].code is ErrorCode.ENDED
        assert got["a node name that is not its own"] is None  # answered with a protocol Error instead
    finally:
        dealer.close()
    assert stored_keys(cluster, job_id) == []
    cluster.cli("cmkill", str(job_id))


def test_a_fence_counts_every_process_of_the_current_run_and_refuses_an_earlier_run():
    from types import SimpleNamespace

    from cm.config import load
    from cm.head.intercom import HeadIntercom
    from cm.protocol import ErrorCode, IntercomAnswer, IntercomFence, IntercomFenceDone

    job = {"_id": 7, "kind": "command", "state": "RUNNING", "runs": 2, "procs": 2,
           "slots": [{"node": "n1", "rank": 0}, {"node": "n2", "rank": 1}]}
    sent = []
    head = HeadIntercom(load(env={}), SimpleNamespace(jobs={7: job}), lambda node, msg: sent.append((node, msg)))

    def fence(node, rank, run=2, epoch=1):
        head.on_node(node, IntercomFence(node=node, job_id=7, run=run, rank=rank, epoch=epoch))

    fence("n1", 0, run=1)  # the run before the requeue is over
    assert isinstance(sent[-1][1], IntercomAnswer) and sent[-1][1].code is ErrorCode.ENDED
    sent.clear()
    for node, rank in [("n1", 0), ("n1", 1), ("n2", 2), ("n1", 1)]:  # a repeat counts once
        fence(node, rank)
    assert sent == []  # 3 of 4 processes
    fence("n2", 3)
    assert sorted(node for node, msg in sent if isinstance(msg, IntercomFenceDone) and msg.epoch == 1) == ["n1", "n2"]
    sent.clear()
    fence("n2", 3)  # a node that missed the news asks again: told again, only it
    assert [(node, msg.epoch) for node, msg in sent] == [("n2", 1)]
