"""`make local-up` / `make local-down` / `make demo` as a user runs them, in a shell.

- a shell that sourced cm.env can take the cluster down and up again; cm.env
  (which every user may read) names no database;
- a database the user did choose and that does not answer is named in a
  one-line error, without a wait for the head;
- nothing of the checkout is left running after `make demo`.
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
