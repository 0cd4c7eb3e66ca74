"""cmacct against the jobs of two real users (made here with useradd), on real daemons and the real database.

A user sees only their own finished jobs; an operator sees everyone's; the window, state and format options
select and show what sacct's would; totals are per user and partition pair; the purge drops what ended more
than CM_ACCT_DAYS ago.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import call_as, real_users

USERS = ("cmt_acct_a", "cmt_acct_b", "cmt_acct_op")
OPERATORS = "cmt_acct_ops"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


@pytest.fixture(scope="module")
def users():
    with real_users(USERS, OPERATORS, ["cmt_acct_op"]) as made:
        yield {name.removeprefix("cmt_acct_"): entry for name, entry in made.items()}


def home_of(cluster, user) -> Path:
    home = cluster.home / user.pw_name
    home.mkdir(exist_ok=True)
    os.chown(home, user.pw_uid, user.pw_gid)
    return home


def submit_as(cluster, user, argv: list[str], **args) -> int:
    job = {"kind": "command", "argv": argv, "cwd": str(home_of(cluster, user)), **args}
    ok, data = call_as(user.pw_uid, user.pw_gid, cluster.run_dir, "submit", job=job)
    assert ok, data
    return data["job_id"]


def cmacct(cluster, user, *argv: str) -> subprocess.CompletedProcess:
    """cmacct's main in a forked child that has become user (uid, gid, groups): the head knows it from the
    socket. (Forked, not run: the interpreter of the checkout is not one other users may execute.)"""
    import importlib
    import tempfile

    from cm.cli import cmacct as command

    for name in ("cm.api.client", "cm.config"):  # what the command imports, imported before the child drops root
        importlib.import_module(name)

    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            sys.stdout = open(out.fileno(), "w", closefd=False)  # pytest's capture replaced both
            sys.stderr = open(err.fileno(), "w", closefd=False)
            os.setgroups(os.getgrouplist(user.pw_name, user.pw_gid))
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            os.environ["CM_RUN_DIR"] = str(cluster.run_dir)
            sys.argv = ["cmacct", *argv]
            try:
                command.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # never run pytest on in the child
            os.write(2, f"{type(exc).__name__}: {exc}".encode())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess(["cmacct", *argv], os.waitstatus_to_exitcode(status), out.read().decode(),
                                       err.read().decode())


def as_json(cluster, user, *argv: str) -> dict:
    proc = cmacct(cluster, user, "--json", *argv)
    assert proc.returncode == 0, proc.stderr + cluster.tail("headnode", 30)
    return json.loads(proc.stdout)


def test_cmacct_shows_each_user_their_own_finished_jobs_and_admins_everyones(make_cluster, users, database_uri,
                                                                             db_name):
    cluster = make_cluster(operator_group=OPERATORS)
    a, b, op = users["a"], users["b"], users["op"]
    ok_a = submit_as(cluster, a, ["true"], name="first")
    failed_a = submit_as(cluster, a, ["sh", "-c", "exit 3"], name="second")
    ok_b = submit_as(cluster, b, ["sleep", "1"], name="first", labels={"workflow": "w1"})
    src = cluster.data_dir / "gpu" / "acct"
    src.mkdir(parents=True)
    (src / "data.bin").write_bytes(b"x" * 100000)
    synced = cluster.submit("cmsync", "gpu:/acct", "cpu:/acct")  # root's
    for job_id in (ok_a, failed_a, ok_b, synced):
        cluster.wait_state(job_id, FINAL, timeout=60)

    mine = as_json(cluster, a)  # default: today, own jobs
    assert sorted(j["id"] for j in mine["jobs"]) == [ok_a, failed_a]
    assert [(t["user"], t["jobs"]) for t in mine["totals"]["users"]] == [(a.pw_name, 2)]
    assert {j["id"]: j["state"] for j in mine["jobs"]} == {ok_a: "COMPLETED", failed_a: "FAILED"}

    for argv in (("-u", b.pw_name), ("--allusers",)):  # someone else's, everyone's: not for a user
        proc = cmacct(cluster, a, *argv)
        assert proc.returncode == 1 and "may see only their own jobs" in proc.stderr, proc.stderr

    everyone = as_json(cluster, op, "--allusers")
    assert sorted(j["id"] for j in everyone["jobs"]) == sorted([ok_a, failed_a, ok_b, synced])
    by_user = {t["user"]: t["jobs"] for t in everyone["totals"]["users"]}
    assert by_user == {a.pw_name: 2, b.pw_name: 1, "root": 1}
    pairs = {t["pair"]: t for t in everyone["totals"]["pairs"]}
    assert pairs["gpu->cpu"]["jobs"] == 1 and pairs["gpu->cpu"]["bytes"] == 100000 and pairs["gpu->cpu"]["files"] == 1
    assert pairs["cpu"]["jobs"] == 3 and pairs["cpu"]["node_hours"] > 0  # the first partition: the default
    assert [j["id"] for j in as_json(cluster, op, "-u", b.pw_name)["jobs"]] == [ok_b]

    # sacct's forms: -s with its abbreviations, --format, --parsable ('|', no header), a window, name, label
    proc = cmacct(cluster, a, "-s", "F", "--parsable", "--format=JobID,JobName,State,ExitCode")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{failed_a}|second|FAILED|3"]
    table = cmacct(cluster, op, "--allusers", "--format", "jobid,user,bytes,files").stdout
    assert table.splitlines()[0].split() == ["JobID", "User", "Bytes", "Files"]
    assert any(line.split()[:2] == [str(synced), "root"] and "100.0 KB" in line for line in table.splitlines())
    assert "PARTITIONS" in table and "gpu->cpu" in table
    assert as_json(cluster, a, "-S", "now+1hour")["jobs"] == []
    assert as_json(cluster, a, "-S", "2020-01-01", "-E", "2020-01-02T00:00")["jobs"] == []
    assert [j["id"] for j in as_json(cluster, op, "--allusers", "--name", "first")["jobs"]] == sorted([ok_a, ok_b])
    assert [j["id"] for j in as_json(cluster, op, "--allusers", "--label", "workflow=w1")["jobs"]] == [ok_b]
    bad = cmacct(cluster, a, "-S", "someday")
    assert bad.returncode == 1 and "is not a time" in bad.stderr

    # the API's query: the same rules (cm.Client over api.sock, as b)
    def api_as_b():
        from cm.api.client import Client

        with Client(str(cluster.run_dir / "api.sock")) as client:
            return [j["id"] for j in client.accounting(time.time() - 3600)["jobs"]]

    from conftest import run_as

    assert run_as(b.pw_uid, b.pw_gid, api_as_b) == [ok_b]

    # records past CM_ACCT_DAYS go: the purger's pass, on a job made to have ended 400 days ago
    from cm import store
    from cm.acct import Purger
    from cm.store.documents import Job

    store.connect(database_uri, db_name)
    try:
        Job._get_collection().update_one({"_id": ok_a}, {"$set": {"ended": time.time() - 400 * 86400}})
        assert Purger(365).purge_once() == 1
        assert store.get_job(ok_a) is None and store.get_job(failed_a) is not None
    finally:
        store.disconnect()
    assert [j["id"] for j in as_json(cluster, a, "-S", "2000-01-01")["jobs"]] == [failed_a]
