"""Many users on one cluster: real Unix users (made here with useradd), real daemons, real files.

Each sync and job acts as its user on every node: the kernel checks what
the user's own shell would be allowed, files belong to the user, and one
user can neither touch another's data nor act on another's jobs.
"""

from __future__ import annotations

import json
import grp
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from cm.protocol import FRAME_HEADER, Info, Reply, decode, frame, unframe
from cm.cli.cminfo import job_details
from conftest import call_as, real_users, run_as

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}
USERS = ("cmt_alice", "cmt_bob", "cmt_oper")
OPERATORS = "cmt_operators"


@pytest.fixture(scope="module")
def users():
    """Two real users, made for this module and removed after it (kept if they were there before)."""
    with real_users(USERS, OPERATORS, ["cmt_oper"]) as made:
        yield {name.removeprefix("cmt_"): entry for name, entry in made.items()}


def in_child_as(user, fn):
    """fn() in a forked child that has become user (uid, gid, groups); returns what fn returned (JSON)."""
    return run_as(user.pw_uid, user.pw_gid, fn, os.getgrouplist(user.pw_name, user.pw_gid))


def ask(cluster, who, op, /, **args):
    """One request to the head as user, over the real socket: (ok, data or error)."""
    return call_as(who.pw_uid, who.pw_gid, cluster.run_dir, op, groups=os.getgrouplist(who.pw_name, who.pw_gid),
                   **args)


def submit_as(cluster, who, /, **args) -> int:
    ok, data = ask(cluster, who, "submit", job=args)
    assert ok, data
    return data["job_id"]


def sync_as(cluster, user, src, dst, **options) -> dict:
    home = home_of(cluster, user)
    job_id = submit_as(cluster, user, kind="sync", src=src, dst=dst, options=options, cwd=str(home))
    return cluster.wait_state(job_id, FINAL, timeout=60)


def home_of(cluster, user) -> Path:
    home = cluster.home / user.pw_name
    if not home.exists():
        home.mkdir()
        os.chown(home, user.pw_uid, user.pw_gid)
    return home


def owned_dir(path: Path, user, mode: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(mode)
    return path


def make_files(top: Path, user, count: int = 5) -> None:
    """A few files (and a big one of several chunks) owned by user, with distinct modes and mtimes."""
    owned_dir(top / "sub", user, 0o750)
    for i in range(count):
        f = top / "sub" / f"f{i}.txt"
        f.write_bytes(os.urandom(100 + i * 1000))
        f.chmod(0o640 if i % 2 else 0o600)
        os.chown(f, user.pw_uid, user.pw_gid)
        os.utime(f, ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))
    big = top / "big.bin"
    big.write_bytes(os.urandom(3 << 20))  # 3 chunks of 1 MiB
    os.chown(big, user.pw_uid, user.pw_gid)
    big.chmod(0o604)


def tree(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_uid, st.st_gid, oct(st.st_mode), st.st_mtime_ns if p.is_file() else 0,
                                         p.read_bytes() if p.is_file() else b"")
    return out


@pytest.fixture
def shared(make_cluster, users):
    """A cluster whose partitions hold a directory for each user, as a site would set them up."""
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1, client_timeout=1, max_pending_per_user=3,
                           operator_token="op-secret-0123456789abcdef", operator_group=OPERATORS)
    for part in ("gpu", "cpu"):
        for name, user in users.items():
            owned_dir(cluster.data_dir / part / name, user, 0o755)
    return cluster


def test_a_users_sync_makes_files_that_are_hers_with_her_modes_and_mtimes(shared, users):
    alice = users["alice"]
    src = shared.data_dir / "gpu" / "alice" / "proj"
    owned_dir(src, alice, 0o755)
    make_files(src, alice)
    job = sync_as(shared, alice, "gpu:/alice/proj", "cpu:/alice/copy")
    assert job["state"] == "COMPLETED", job
    dst = shared.data_dir / "cpu" / "alice" / "copy"
    assert tree(dst) == tree(src)
    assert {st[0] for st in tree(dst).values()} == {alice.pw_uid}
    assert dst.stat().st_uid == alice.pw_uid
    log_dir = home_of(shared, alice) / "cmlogs" / str(job["id"])
    assert all(p.stat().st_uid == alice.pw_uid for p in [log_dir, *log_dir.rglob("*")])


def test_a_root_sync_keeps_every_owner(shared, users):
    alice, bob = users["alice"], users["bob"]
    src = shared.data_dir / "gpu" / "mixed"
    owned_dir(src, alice, 0o755)
    make_files(src, alice)
    theirs = src / "bobs.txt"
    theirs.write_text("bob's\n")
    os.chown(theirs, bob.pw_uid, bob.pw_gid)
    setuid = src / "tool"
    setuid.write_bytes(b"#!/bin/sh\n")
    os.chown(setuid, bob.pw_uid, bob.pw_gid)
    setuid.chmod(0o4755)
    job_id = shared.submit("cmsync", "-n", "2", "--wait", "gpu:/mixed", "cpu:/mixed-copy")
    assert shared.job(job_id)["state"] == "COMPLETED"
    assert tree(shared.data_dir / "cpu" / "mixed-copy") == tree(src)


def test_a_root_resync_sets_only_the_owners_that_changed(shared, users):
    alice, bob = users["alice"], users["bob"]
    src = shared.data_dir / "gpu" / "owned"
    owned_dir(src, alice, 0o755)
    make_files(src, alice)
    dst = shared.data_dir / "cpu" / "owned-copy"
    first = shared.submit("cmsync", "--wait", "gpu:/owned", "cpu:/owned-copy")
    assert shared.job(first)["state"] == "COMPLETED"
    changes = {p: p.lstat().st_ctime_ns for p in [dst, *dst.rglob("*")]}  # chown changes ctime, same owner or not
    moved = next(p for p in sorted(src.rglob("*")) if p.is_file())
    os.chown(moved, bob.pw_uid, bob.pw_gid)
    again = shared.submit("cmsync", "--wait", "gpu:/owned", "cpu:/owned-copy")
    assert shared.job(again)["state"] == "COMPLETED"
    copy = dst / moved.relative_to(src)
    assert (copy.stat().st_uid, copy.stat().st_gid) == (bob.pw_uid, bob.pw_gid)
    touched = [p for p, ctime in changes.items() if p.lstat().st_ctime_ns != ctime]
    assert touched == [copy]  # nothing else had its owner set again
    assert tree(dst) == tree(src)


def test_an_operators_sync_reads_everything_and_keeps_owners(shared, users):
    alice, oper = users["alice"], users["oper"]
    private = owned_dir(shared.data_dir / "gpu" / "alice" / "archive", alice, 0o700)
    make_files(private, alice)
    job = sync_as(shared, oper, "gpu:/alice/archive", "cpu:/backup/alice")
    assert job["state"] == "COMPLETED", job
    assert tree(shared.data_dir / "cpu" / "backup" / "alice") == tree(private)


def test_bob_cannot_copy_alices_private_directory(shared, users):
    alice, bob = users["alice"], users["bob"]
    private = owned_dir(shared.data_dir / "gpu" / "alice" / "private", alice, 0o700)
    make_files(private, alice)
    job = sync_as(shared, bob, "gpu:/alice/private", "cpu:/bob/stolen")
    assert job["state"] == "FAILED"
    assert "Permission denied" in job["reason"] and "private" in job["reason"], job["reason"]
    assert not (shared.data_dir / "cpu" / "bob" / "stolen").exists()
    node_logs = shared.cli("cminfo", str(job["id"])).stdout
    assert "Permission denied" in node_logs
    err = home_of(shared, bob) / "cmlogs" / str(job["id"]) / job["nodes"][0] / "0.err"
    assert "Permission denied" in err.read_text()


def test_bob_cannot_write_into_alices_directory(shared, users):
    bob = users["bob"]
    src = owned_dir(shared.data_dir / "gpu" / "bob" / "mine", bob, 0o755)
    make_files(src, bob)
    before = tree(shared.data_dir / "cpu" / "alice")
    job = sync_as(shared, bob, "gpu:/bob/mine", "cpu:/alice/x")
    assert job["state"] == "FAILED"
    assert "Permission denied" in job["reason"], job["reason"]
    assert tree(shared.data_dir / "cpu" / "alice") == before
    assert not (shared.data_dir / "cpu" / "alice" / "x").exists()
    # the node is as healthy as before: bob's own sync to his own directory goes through
    assert sync_as(shared, bob, "gpu:/bob/mine", "cpu:/bob/mine")["state"] == "COMPLETED"
    assert set(shared.node_states().values()) == {"IDLE"}


def test_bobs_delete_against_alices_tree_removes_nothing(shared, users):
    alice, bob = users["alice"], users["bob"]
    pub = owned_dir(shared.data_dir / "cpu" / "alice" / "pub", alice, 0o755)
    make_files(pub, alice)
    owned_dir(shared.data_dir / "gpu" / "bob" / "empty", bob, 0o755)
    before = tree(pub)
    job = sync_as(shared, bob, "gpu:/bob/empty", "cpu:/alice/pub", delete=True)
    assert job["state"] == "FAILED"
    assert tree(pub) == before


def test_users_act_only_on_their_own_jobs_and_see_only_their_own_environment(shared, users):
    alice, bob = users["alice"], users["bob"]
    home = home_of(shared, alice)
    job_id = submit_as(shared, alice, kind="command", argv=["sleep", "30"], cwd=str(home), hold=True,
                       env=["SECRET=alices-secret", "PATH=/usr/bin:/bin"])
    for op, args in (("cancel", {"job_ids": [job_id]}), ("control", {"action": "release", "job_id": job_id}),
                     ("control", {"action": "hold", "job_id": job_id})):
        ok, data = ask(shared, bob, op, **args)
        text = json.dumps(data)
        assert "belongs to cmt_alice" in text, (op, data)
    assert shared.job(job_id)["state"] == "HELD"
    ok, data = ask(shared, bob, "info", job_id=job_id)
    assert ok and data["jobs"][0]["env"] is None and "alices-secret" not in json.dumps(data)
    assert "alices-secret" not in job_details(data["jobs"][0]) and "sleep 30" in job_details(data["jobs"][0])
    ok, data = ask(shared, alice, "info", job_id=job_id)
    assert ok and "SECRET=alices-secret" in data["jobs"][0]["env"]
    assert "SECRET=alices-secret" in job_details(data["jobs"][0])  # what `cminfo JOBID` prints for her
    ok, data = ask(shared, alice, "cancel", job_ids=[job_id])
    assert ok and data[str(job_id)]["ok"]


def test_a_user_cannot_pass_for_another_through_request_fields(shared, users):
    alice, bob = users["alice"], users["bob"]
    home = home_of(shared, bob)
    job_id = submit_as(shared, bob, kind="command", argv=["id", "-un"], cwd=str(home), uid=alice.pw_uid,
                       gid=alice.pw_gid, user="cmt_alice", caller="cmt_alice")
    job = shared.wait_state(job_id, FINAL)
    assert job["user"] == "cmt_bob" and job["state"] == "COMPLETED"
    out = home / "cmlogs" / str(job_id) / job["nodes"][0] / "0.out"
    assert out.read_text().strip() == "cmt_bob" and out.stat().st_uid == bob.pw_uid


def test_a_job_runs_with_its_users_uid_gid_and_supplementary_groups(shared, users):
    oper = users["oper"]  # a member of a group besides its own
    home = home_of(shared, oper)
    job_id = submit_as(shared, oper, kind="command", argv=["/bin/sh", "-c", "id -u; id -g; id -G"], cwd=str(home),
                       env=["PATH=/usr/bin:/bin"])
    job = shared.wait_state(job_id, FINAL)
    assert job["state"] == "COMPLETED", job
    out = (home / "cmlogs" / str(job_id) / job["nodes"][0] / "0.out").read_text().split("\n")
    groups = set(os.getgrouplist(oper.pw_name, oper.pw_gid))
    assert grp.getgrnam(OPERATORS).gr_gid in groups and len(groups) >= 2
    assert (int(out[0]), int(out[1])) == (oper.pw_uid, oper.pw_gid), out
    assert {int(g) for g in out[2].split()} == groups, out  # every supplementary group, and no other (not root's)


def test_a_job_in_a_directory_its_user_cannot_enter_fails_with_the_reason(shared, users):
    alice = users["alice"]
    locked = owned_dir(shared.home / "locked", users["bob"], 0o700)
    job_id = submit_as(shared, alice, kind="command", argv=["true"], cwd=str(locked))
    job = shared.wait_state(job_id, FINAL)
    assert job["state"] == "FAILED"
    assert "permission denied" in job["reason"].lower() and str(locked) in job["reason"], job["reason"]
    assert not (locked / "cmlogs").exists()


def test_the_operator_token_reaches_no_job_sender_mover_or_output(shared, users):
    alice = users["alice"]
    token = "op-secret-0123456789abcdef"
    home = home_of(shared, alice)
    src = owned_dir(shared.data_dir / "gpu" / "alice" / "slow", alice, 0o755)
    make_files(src, alice)
    job_id = submit_as(shared, alice, kind="command", argv=["sleep", "20"], cwd=str(home),
                       env=[f"CM_OPERATOR_TOKEN={token}", f"COPIED={token}", "PATH=/usr/bin:/bin"])
    shared.wait_state(job_id, "RUNNING")
    sync_id = submit_as(shared, alice, kind="sync", src="gpu:/alice/slow", dst="cpu:/alice/slow",
                        options={"bwlimit": 1 << 20}, cwd=str(home))
    shared.wait_state(sync_id, "RUNNING")
    time.sleep(0.5)  # the sender is running now (bwlimit: a few seconds)
    daemons = {int(p.read_text()) for p in shared.run_dir.glob("*.pid")}
    seen = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in daemons:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"cm.transfer" in cmdline or b"sleep\x0020" in cmdline:
            seen.append(cmdline.split(b"\0")[:3])
            assert token.encode() not in environ and token.encode() not in cmdline, cmdline
    assert any(b"sleep" in c[0] for c in seen) and any(b"cm.transfer.send" in b" ".join(c) for c in seen)
    assert any(b"cm.transfer.receiver" in b" ".join(c) for c in seen)
    info = shared.cli("cminfo", "--all", "--json").stdout + shared.cli("cminfo", str(job_id)).stdout
    assert token not in info
    shared.cli("cmkill", str(job_id), str(sync_id))
    shared.wait_state(sync_id, FINAL)
    for log in [*home.rglob("*.out"), *home.rglob("*.err"), *shared.run_dir.glob("*.log")]:
        assert token not in log.read_text(errors="replace"), log


def test_a_user_may_keep_only_so_many_jobs_waiting(shared, users):
    alice = users["alice"]
    home = home_of(shared, alice)
    ids = [submit_as(shared, alice, kind="command", argv=["true"], cwd=str(home), hold=True) for _ in range(3)]
    ok, error = ask(shared, alice, "submit", job=dict(kind="command", argv=["true"], cwd=str(home), hold=True))
    assert not ok and "CM_MAX_PENDING_PER_USER" in error
    shared.cli("cmkill", *map(str, ids))
    ok, _ = ask(shared, alice, "submit", job=dict(kind="command", argv=["true"], cwd=str(home)))
    assert ok


def test_slow_clients_neither_delay_cminfo_nor_keep_their_connection(shared, users):
    loris = []
    for _ in range(20):  # each sends half a request and then nothing
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(shared.run_dir / "head.sock"))
        body = frame(Info())
        s.sendall(body[: len(body) // 2])
        loris.append(s)
    started = time.monotonic()
    shared.cli("cminfo")
    # a head that waited for each half request in turn would answer after 20 client timeouts (20 s here)
    assert time.monotonic() - started < 10
    time.sleep(2.5)  # client_timeout is 1 s here
    for s in loris:
        s.settimeout(2)
        data = s.recv(65536)
        reply = decode(unframe(bytearray(data))) if len(data) > FRAME_HEADER else None
        assert reply is None or (isinstance(reply, Reply) and "not complete" in reply.error)
        assert s.recv(65536) == b""  # closed by the head
        s.close()


def test_a_request_too_large_is_refused_from_its_header(shared):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(shared.run_dir / "head.sock"))
    s.sendall((2 << 20).to_bytes(FRAME_HEADER, "big") + b"x" * 1000)
    s.settimeout(5)
    reply = decode(unframe(bytearray(s.recv(65536))))
    assert not reply.ok and "exceeds the limit" in reply.error
    s.close()
    shared.cli("cminfo")


def test_one_user_may_hold_only_so_many_connections(shared, users):
    run_dir = str(shared.run_dir)

    def flood():
        socks, refused = [], 0
        for _ in range(70):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(os.path.join(run_dir, "head.sock"))
            socks.append(s)
        time.sleep(0.5)
        for s in socks:
            s.setblocking(False)
            try:
                data = s.recv(65536)
                refused += bool(data) and b"connections open" in data
            except BlockingIOError:
                pass
        return refused

    assert in_child_as(users["bob"], flood) == 70 - 64
    shared.cli("cminfo")


def test_a_mover_that_dies_is_started_again_and_the_node_stays_up(shared, users):
    alice = users["alice"]
    node_pid = int((shared.run_dir / "computenode-3.pid").read_text())
    children = subprocess.run(["pgrep", "-P", str(node_pid), "-f", "cm.transfer.receiver"],
                              capture_output=True, text=True).stdout.split()
    assert len(children) == 1
    os.kill(int(children[0]), signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        again = subprocess.run(["pgrep", "-P", str(node_pid), "-f", "cm.transfer.receiver"],
                               capture_output=True, text=True).stdout.split()
        if again and again != children:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the mover was not started again")
    os.kill(node_pid, 0)
    src = owned_dir(shared.data_dir / "gpu" / "alice" / "after", alice, 0o755)
    make_files(src, alice)
    job = sync_as(shared, alice, "gpu:/alice/after", "computenode-3:/alice/after")
    assert job["state"] == "COMPLETED", job
    assert tree(shared.data_dir / "cpu" / "alice" / "after") == tree(src)
