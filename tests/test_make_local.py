"""`make local-up` / `make local-down` / `make demo` as a user runs them, in a shell.

- a shell that sourced cm.env can take the cluster down and up again; cm.env
  (which every user may read) names no database;
- a database the user did choose and that does not answer is named in a
  one-line error, without a wait for the head;
- nothing of the checkout is left running after `make demo`;
- `make` with no Docker engine says so and exits non-zero.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cm.cluster.db import free_port

REPO = Path(__file__).resolve().parents[1]
LOCAL = f"{sys.executable} -m cm.cluster.local"


def shell(script: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CM_") and k != "MONGODB_URI"}
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], capture_output=True, text=True,
                          timeout=timeout, env={**base, **env}, cwd=str(REPO))


def test_a_shell_that_sourced_cm_env_can_take_the_cluster_down_and_up_again(tmp_path):
    run = tmp_path / "drive" / "run"
    args = f"--run-dir {run} --nodes 2 --partitions gpu:1,cpu:1"
    done = shell(f"""
        trap '{LOCAL} down --run-dir {run} >/dev/null' EXIT
        {LOCAL} up {args}
        . {run}/cm.env
        {LOCAL} down --run-dir {run}
        {LOCAL} up {args}
        . {run}/cm.env
        echo "MONGODB_URI=${{MONGODB_URI:-}}"
        cminfo --json
        """, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("local cluster up") == 2
    assert '"computenode-2"' in done.stdout
    assert "MONGODB_URI=\n" in done.stdout and "mongodb" not in (run / "cm.env").read_text().lower()


def test_a_database_the_user_chose_that_does_not_answer_is_named(tmp_path):
    run = tmp_path / "drive" / "run"
    uri = f"mongodb://127.0.0.1:{free_port()}/"
    t0 = time.monotonic()
    done = shell(f"{LOCAL} up --run-dir {run} --nodes 2 --partitions gpu:1,cpu:1", timeout=60, MONGODB_URI=uri)
    assert done.returncode == 1
    assert f"the database at MONGODB_URI={uri} does not answer" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert time.monotonic() - t0 < 30
    assert not list(run.glob("*.pid")), "nothing may be left running"


def checkout_processes() -> dict[int, str]:
    """Processes whose working directory or command line is in this checkout, but this test's own."""
    mine = {os.getpid()}
    pid = os.getppid()
    while pid > 1:  # this test's ancestors (pytest's runner, make) run from the checkout too
        mine.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            break
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in mine:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if str(REPO) in cmdline or cwd == str(REPO) or cwd.startswith(str(REPO) + "/"):
            out[int(proc.name)] = f"{cmdline.strip()} (cwd {cwd})"
    return out


def test_nothing_of_the_checkout_is_left_running_after_make_demo():
    if (REPO / "drive" / "run" / "headnode.pid").exists():
        pytest.skip("a local cluster of this checkout is running (drive/run/headnode.pid): `make local-down` first")
    before = checkout_processes()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM_") and k != "MONGODB_URI"}
    done = subprocess.run(["make", "--no-print-directory", "demo"], cwd=str(REPO), capture_output=True, text=True,
                          timeout=280, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "trees are identical" in done.stdout
    deadline = time.monotonic() + 10  # processes being reaped
    while (left := {p: c for p, c in checkout_processes().items() if p not in before}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, "left running after make demo:\n" + "\n".join(f"{p}: {c}" for p, c in left.items())
    assert not list((REPO / "drive" / "run").glob("*.pid"))


def test_make_without_a_docker_engine_says_so_and_fails(tmp_path):
    """A script that runs `make` must not take the cluster for up when no engine answers."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    (fake / "docker").chmod(0o755)
    done = shell("make --no-print-directory", timeout=60, PATH=f"{fake}:{os.environ['PATH']}")
    assert done.returncode != 0, done.stdout + done.stderr
    assert "no Docker engine here" in done.stderr and "make local-up" in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2, done.stderr  # the line, and make's own "Error 1"


def test_settings_given_to_make_local_up_reach_its_daemons(tmp_path):
    if (REPO / "drive" / "run" / "headnode.pid").exists():
        pytest.skip("a local cluster of this checkout is running (drive/run/headnode.pid): `make local-down` first")
    port = free_port()
    run = REPO / "drive" / "run"
    done = shell(f"""
        trap 'make --no-print-directory local-down >/dev/null' EXIT
        CM_API_PORT={port} CM_KILL_GRACE=7 CM_RUN_DIR={tmp_path} make --no-print-directory local-up NODES=2 \\
            PARTITIONS=gpu:1,cpu:1
        curl -sS --max-time 10 --cacert {run}/api.crt https://127.0.0.1:{port}/healthz
        echo
        for name in headnode computenode-1; do
            echo "$name: $(tr '\\0' '\\n' < /proc/$(cat {run}/$name.pid)/environ | grep -E '^CM_(KILL_GRACE|RUN_DIR)=' | sort | tr '\\n' ' ')"
        done
        """, timeout=200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert '{"alive":true}' in done.stdout, done.stdout  # the head listens on CM_API_PORT
    for name in ("headnode", "computenode-1"):
        line = next(l for l in done.stdout.splitlines() if l.startswith(f"{name}:"))
        assert "CM_KILL_GRACE=7" in line, line  # the caller's setting, on every daemon
        assert f"CM_RUN_DIR={run}" in line, line  # the cluster's own run dir wins over the caller's
    assert not list(run.glob("*.pid"))
