"""A spare sender (``send --spare``): loaded ahead of its job, then runs it as the job's user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec
import pytest

from cm.node.sync import Spares, start_sender
from cm.protocol import SourceTransfer, SyncSource

from .conftest import assert_same_tree, make_tree, sender_env, spec_for, write

NOBODY = 65534


def _spare() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cm.transfer.send", "--spare"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=sender_env())


def _job(spec: dict, uid: int | None = None, gid: int | None = None, stderr: str | None = None) -> str:
    return json.dumps({"transfer": spec, "uid": os.geteuid() if uid is None else uid,
                       "gid": os.getegid() if gid is None else gid,
                       "groups": os.getgroups() if uid is None else [], "stderr": stderr})


def test_a_spare_runs_the_job_it_is_given(receiver, roots, tmp_path):
    src = roots[0]
    make_tree(src)
    proc = _spare()
    log = tmp_path / "rank.err"
    out, err = proc.communicate(_job(spec_for(receiver, src), stderr=str(log)), timeout=60)
    assert proc.returncode == 0, err + (log.read_text() if log.exists() else "")
    assert json.loads(out.splitlines()[-1])["done"]
    assert_same_tree(src, receiver.dst)


def test_a_spare_let_go_exits_quietly():
    proc = _spare()
    out, err = proc.communicate("", timeout=60)
    assert (proc.returncode, out, err) == (0, "", "")


@pytest.mark.parametrize("job", ['{"transfer": {}}', '{"transfer": {}, "uid": "root", "gid": 0, "groups": []}',
                                 "[1, 2]"])
def test_a_spare_refuses_a_malformed_job(job):
    proc = _spare()
    _, err = proc.communicate(job, timeout=60)
    assert proc.returncode == 2
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_spare_reads_the_source_as_the_jobs_user(receiver):
    top = Path(tempfile.mkdtemp(prefix="cm-spare-"))  # pytest's tmp_path is closed to other users
    try:
        top.chmod(0o755)
        src = top / "src"
        write(src / "open.txt", b"anyone may read this")
        write(src / "secret.txt", b"only root may read this", mode=0o600)
        src.chmod(0o755)
        log = top / "rank.err"
        log.touch()
        os.chown(log, NOBODY, NOBODY)
        proc = _spare()
        _, err = proc.communicate(_job(spec_for(receiver, src), uid=NOBODY, gid=NOBODY, stderr=str(log)),
                                  timeout=60)
        assert proc.returncode == 1, err
        assert "secret.txt" in log.read_text() and "Permission denied" in log.read_text()
    finally:
        shutil.rmtree(top)
    assert (receiver.dst / "open.txt").read_bytes() == b"anyone may read this"
    assert not (receiver.dst / "secret.txt").exists()


def _wait(proc: subprocess.Popen) -> int:
    """Wait for a sender started by the node (its stdin is written and closed, its stdout non-blocking)."""
    os.set_blocking(proc.stdout.fileno(), True)
    proc.stdout.read()
    proc.stdout.close()
    return proc.wait(timeout=60)


def test_the_node_hands_a_job_to_its_spare_and_keeps_one_ready(receiver, roots, tmp_path, monkeypatch):
    src = roots[0]
    make_tree(src)
    monkeypatch.setenv("PYTHONPATH", sender_env()["PYTHONPATH"])
    spares = Spares(1)
    spares.fill()
    assert spares._ready == []  # none until this node has been a source once
    transfer = {k: v for k, v in spec_for(receiver, src).items() if k != "src_root"}
    spec = SyncSource(run=1, uid=os.geteuid(), gid=os.getegid(), rank=0, cwd=str(tmp_path), name="sync", user="me",
                      time_limit=60.0, transfer=SourceTransfer(**transfer, transport="tcp", owners=False))
    try:
        proc, err = start_sender(spec, "n1", 7, str(src), spares)
        assert _wait(proc) == 0, err.read_text()
        assert err == tmp_path / "cmlogs/7/n1/0.err"
        spares.fill()
        (spare,) = spares._ready
        assert spare.poll() is None
        # refused by the receiver: the error reaches the log
        spec = msgspec.structs.replace(spec, transfer=msgspec.structs.replace(spec.transfer, transfer_id="unknown"))
        proc, err = start_sender(spec, "n1", 8, str(src), spares)
        assert proc is spare
        assert _wait(proc) == 1
        assert "refused" in err.read_text()
    finally:
        spares.close()
    assert spare.poll() is not None


def test_a_sender_gets_none_of_the_daemons_secrets(monkeypatch):
    from cm.node import sync

    monkeypatch.setenv("CM_OPERATOR_TOKEN", "s3cret")
    monkeypatch.setenv("CM_HEAD_ADDR", "tcp://head:1")
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/tmp/x")
    env = sync._sender_env()
    assert "CM_OPERATOR_TOKEN" not in env and "s3cret" not in env.values()
    assert not [k for k in env if k.startswith("CM_")]
    assert env["NUMBA_CACHE_DIR"] == "/tmp/x"
