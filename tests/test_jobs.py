"""Command jobs end to end: real database, real daemons, real processes, real files."""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import call_as


def test_nodes_register_and_show_their_resources(cluster):
    info = cluster.info()
    nodes = {n["name"]: n for n in info["nodes"]}
    assert sorted(nodes) == ["computenode-1", "computenode-2", "computenode-3", "computenode-4"]
    assert {n["partition"] for n in nodes.values()} == {"gpu", "cpu"}
    for n in nodes.values():
        assert n["state"] == "IDLE"
        assert n["cpus"] == n["cpus_free"] == os.cpu_count()
        assert n["mem_mb"] > 0
    table = cluster.cli("cminfo").stdout
    assert "computenode-1" in table and "CPUS(free/total)" in table


def test_a_multi_node_job_gets_its_environment_processes_and_log_files(cluster):
    script = 'echo "$CM_JOB_ID $CM_NODE_RANK $CM_PROC_RANK $CM_NNODES $CM_NODELIST $MY_VAR $(pwd)"; echo oops >&2'
    job_id = cluster.submit("cmrun", "-n", "2", "-p", "2", "--partition", "cpu", "--wait", "sh", "-c", script,
                            env={"MY_VAR": "from-user"})
    job = cluster.job(job_id)
    assert job["state"] == "COMPLETED" and job["exit_code"] == 0
    assert job["nodes"] == ["computenode-3", "computenode-4"]
    logs = cluster.home / "cmlogs" / str(job_id)
    seen = set()
    for node_rank, node in enumerate(job["nodes"]):
        for local in range(2):
            rank = node_rank * 2 + local
            out = (logs / node / f"{rank}.out").read_text().split()
            assert out == [str(job_id), str(node_rank), str(rank), "2", "computenode-3,computenode-4",
                           "from-user", str(cluster.home)]
            assert (logs / node / f"{rank}.err").read_text() == "oops\n"
            seen.add(rank)
    assert seen == {0, 1, 2, 3}


def test_output_patterns_name_the_log_files(cluster):
    job_id = cluster.submit("cmrun", "-J", "pat", "-o", "out/%x-%j-%t.txt", "-e", "out/%x-%j-%t.err", "--wait",
                            "echo", "hello")
    assert (cluster.home / "out" / f"pat-{job_id}-0.txt").read_text() == "hello\n"
    assert (cluster.home / "out" / f"pat-{job_id}-0.err").exists()


def test_wait_returns_the_job_exit_code(cluster):
    proc = cluster.cli("cmrun", "--wait", "sh", "-c", "exit 3", check=False)
    assert proc.returncode == 3
    job_id = int(proc.stdout.split()[-1])
    assert cluster.job(job_id)["state"] == "FAILED"
    assert cluster.job(job_id)["exit_code"] == 3


def test_the_time_limit_stops_a_job_with_timeout(make_cluster):
    cluster = make_cluster("cpu:1", nodes=1)
    start = time.monotonic()
    proc = cluster.cli("cmrun", "-t", "0:01", "--wait", "sleep", "60", check=False)
    assert proc.returncode != 0
    job_id = int(proc.stdout.split()[-1])
    job = cluster.job(job_id)
    assert job["state"] == "TIMEOUT"
    assert "stopped by the head" not in (job.get("reason") or ""), job  # its node stopped it, not the backstop
    assert time.monotonic() - start < 20


def test_a_job_that_ignores_sigterm_is_killed_after_the_grace(make_cluster):
    cluster = make_cluster("cpu:1", nodes=1)
    job_id = cluster.submit("cmrun", "-t", "0:01", "sh", "-c", "trap '' TERM; sleep 60")
    job = cluster.wait_state(job_id, "TIMEOUT", timeout=20)
    assert job["exit_code"] == 128 + signal.SIGKILL


def test_cmkill_cancels_a_running_job_on_every_node(cluster):
    job_id = cluster.submit("cmrun", "-n", "2", "--partition", "gpu", "sh", "-c", "echo $$ > pid.$CM_NODE_RANK; sleep 60")
    cluster.wait_state(job_id, "RUNNING")
    deadline = time.monotonic() + 10
    while not all((cluster.home / f"pid.{r}").exists() for r in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [int((cluster.home / f"pid.{r}").read_text()) for r in (0, 1)]
    out = cluster.cli("cmkill", str(job_id)).stdout
    assert f"job {job_id}" in out
    cluster.wait_state(job_id, "CANCELLED", timeout=10)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert cluster.info()["nodes"][0]["cpus_free"] == cluster.info()["nodes"][0]["cpus"]


def test_cmkill_cancels_a_pending_job_before_it_runs(make_cluster):
    cluster = make_cluster("cpu:1", nodes=1)
    cpus = os.cpu_count()
    blocker = cluster.submit("cmrun", "-c", str(cpus), "sleep", "30")
    waiting = cluster.submit("cmrun", "-c", str(cpus), "touch", "should-not-exist")
    cluster.wait_state(blocker, "RUNNING")
    assert cluster.job(waiting)["state"] == "PENDING"
    cluster.cli("cmkill", str(waiting))
    assert cluster.job(waiting)["state"] == "CANCELLED"
    cluster.cli("cmkill", str(blocker))
    cluster.wait_state(blocker, "CANCELLED")
    time.sleep(0.5)
    assert not (cluster.home / "should-not-exist").exists()


def test_killing_a_finished_or_unknown_job_says_so(cluster):
    job_id = cluster.submit("cmrun", "--wait", "true")
    proc = cluster.cli("cmkill", str(job_id), check=False)
    assert proc.returncode != 0 and "already finished" in proc.stderr
    proc = cluster.cli("cmkill", "999999", check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    proc = cluster.cli("cmkill", "abc", check=False)
    assert proc.returncode != 0 and "invalid job id" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_job_that_can_never_fit_is_refused_at_submit(cluster):
    proc = cluster.cli("cmrun", "-n", "3", "--partition", "gpu", "true", check=False)
    assert proc.returncode != 0 and "can never run" in proc.stderr
    proc = cluster.cli("cmrun", "-c", "1000", "true", check=False)
    assert proc.returncode != 0 and "can never run" in proc.stderr
    proc = cluster.cli("cmrun", "--partition", "nope", "true", check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    proc = cluster.cli("cmrun", "-t", "soon", "true", check=False)
    assert proc.returncode != 0 and "invalid time" in proc.stderr
    assert cluster.info()["jobs"] == []


def test_jobs_wait_for_resources_then_start_in_order(make_cluster):
    cluster = make_cluster("cpu:1", nodes=1)
    cpus = str(os.cpu_count())
    ids = [cluster.submit("cmrun", "-c", cpus, "-t", "1", "sh", "-c", f"date +%s.%N > started.{i}; sleep 0.3")
           for i in range(3)]
    for job_id in ids:
        cluster.wait_state(job_id, "COMPLETED", timeout=30)
    starts = [float((cluster.home / f"started.{i}").read_text()) for i in range(3)]
    assert starts == sorted(starts)
    jobs = {j["id"]: j for j in cluster.info()["jobs"]}
    assert jobs[ids[1]]["started"] >= jobs[ids[0]]["ended"]


def test_backfill_runs_a_short_job_past_a_blocked_wide_one(make_cluster):
    cluster = make_cluster("cpu:2", nodes=2)
    cpus = str(os.cpu_count())
    long = cluster.submit("cmrun", "-c", cpus, "-t", "1", "sleep", "5")  # one node busy for up to a minute
    cluster.wait_state(long, "RUNNING")
    wide = cluster.submit("cmrun", "-n", "2", "-c", cpus, "-t", "5", "true")  # needs both nodes: blocked
    short = cluster.submit("cmrun", "-c", cpus, "-t", "0:30", "true")  # fits now and ends before `long` may
    late = cluster.submit("cmrun", "-c", cpus, "-t", "10", "sleep", "1")  # would delay `wide`: must wait
    cluster.wait_state(short, "COMPLETED", timeout=10)
    assert cluster.job(wide)["state"] == "PENDING"
    assert cluster.job(late)["state"] == "PENDING"
    cluster.wait_state(wide, "COMPLETED", timeout=30)
    cluster.wait_state(late, "COMPLETED", timeout=30)
    assert cluster.job(late)["started"] >= cluster.job(wide)["started"]


def test_a_user_cannot_cancel_another_users_job(cluster, nobody):
    job_id = cluster.submit("cmrun", "sleep", "30")
    ok, error = call_as(nobody.pw_uid, nobody.pw_gid, cluster.run_dir, "cancel", job_ids=[job_id])
    assert ok and not error[str(job_id)]["ok"] and "only act on your own jobs" in error[str(job_id)]["error"]
    assert cluster.job(job_id)["state"] in ("RUNNING", "DISPATCHING")
    ok, error = call_as(nobody.pw_uid, nobody.pw_gid, cluster.run_dir, "control", action="drain",
                        node="computenode-1")
    assert not ok and "administrator" in error
    cluster.cli("cmkill", str(job_id))


def test_jobs_run_as_the_submitting_user_whatever_the_request_says(cluster, nobody):
    workdir = cluster.home / "nobody"
    workdir.mkdir()
    os.chown(workdir, nobody.pw_uid, nobody.pw_gid)
    ok, data = call_as(nobody.pw_uid, nobody.pw_gid, cluster.run_dir, "submit", user="root", uid=0, job=dict(
        kind="command", argv=["id", "-u"], cwd=str(workdir), env=["PATH=/usr/bin:/bin"], user="root", uid=0))
    assert ok, data
    job = cluster.wait_state(data["job_id"], "COMPLETED")
    assert job["user"] == "nobody"
    out = workdir / "cmlogs" / str(job["id"]) / job["nodes"][0] / "0.out"
    assert out.read_text().strip() == str(nobody.pw_uid)
    assert out.stat().st_uid == nobody.pw_uid
