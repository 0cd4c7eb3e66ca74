"""A spare sender (``send --spare``, or forked by the node's zygote): loaded ahead of its job, then runs it
as the job's user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cm.node.sync import ForkedSender, WarmSenders, start_sender
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
        assert proc.returncode == 23, err  # exitcodes.PARTIAL: the rest was copied
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


def _wait_loaded(warm: WarmSenders, timeout: float = 60) -> None:
    """Until the zygote says it has loaded numba (its forks answer from then on)."""
    deadline = time.monotonic() + timeout
    while not warm.ready and time.monotonic() < deadline:
        warm.collect()
        warm.wait_readable(0.05)
    assert warm.ready, "the zygote did not load in time"


@pytest.fixture
def warm(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", sender_env()["PYTHONPATH"])
    senders = WarmSenders(True)
    senders.start()
    _wait_loaded(senders)
    yield senders
    senders.close()


def _node_spec(receiver, src: Path, tmp_path: Path, **overrides) -> SyncSource:
    transfer = {k: v for k, v in spec_for(receiver, src).items() if k != "src_root"}
    transfer.update(transport="tcp", owners=False, **overrides)
    return SyncSource(run=1, rank=0, name="sync", user="me", uid=os.geteuid(), gid=os.getegid(), time_limit=60,
                      cwd=str(tmp_path), transfer=SourceTransfer(**transfer))


def test_the_node_forks_its_senders_from_a_zygote_loaded_at_its_start(warm, receiver, roots, tmp_path):
    src = roots[0]
    make_tree(src)
    zygote = warm.proc.pid
    spec = _node_spec(receiver, src, tmp_path)
    proc, err = start_sender(spec, "n1", 7, str(src), warm)
    assert isinstance(proc, ForkedSender)
    assert int(Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[1]) == zygote
    assert os.getpgid(proc.pid) == proc.pid  # a session of its own: stopping the job stops its group
    assert _wait(proc) == 0, err.read_text()
    assert err == tmp_path / "cmlogs/7/n1/0.err"
    assert_same_tree(src, receiver.dst)
    # (forked from the zygote: its parent above; how much sooner it answers than a cold sender is a speed claim)
    spec = _node_spec(receiver, src, tmp_path, transfer_id="unknown")  # refused: the error reaches the log
    proc, err = start_sender(spec, "n1", 8, str(src), warm)
    assert _wait(proc) == 1
    assert "refused" in err.read_text()
    assert warm.proc.pid == zygote and warm.alive()  # one zygote serves every sync


def test_forked_senders_run_side_by_side_and_a_killed_one_reports_its_signal(warm, receiver, roots, tmp_path):
    src = roots[0]
    make_tree(src)
    spec = _node_spec(receiver, src, tmp_path)
    procs = [start_sender(spec, "n1", 9, str(src), warm)[0] for _ in range(3)]
    assert len({p.pid for p in procs}) == 3
    procs[0].kill()
    assert procs[0].wait(timeout=30) == -9
    for proc in procs[1:]:
        proc.stdin.close() if not proc.stdin.closed else None
        _wait(proc)


def test_a_dead_zygote_means_cold_senders_then_a_new_zygote(warm, receiver, roots, tmp_path):
    src = roots[0]
    make_tree(src)
    old = warm.proc.pid
    os.kill(old, 9)
    warm.proc.wait(timeout=10)
    proc, err = start_sender(_node_spec(receiver, src, tmp_path), "n1", 10, str(src), warm)
    assert isinstance(proc, subprocess.Popen)  # started cold, and it still does the job
    assert _wait(proc) == 0, err.read_text()
    warm._not_before = 0.0  # not the 30 s a node waits before starting a zygote that died again
    warm.start()
    assert warm.alive() and warm.proc.pid != old


def test_a_sync_never_waits_for_a_zygote_still_loading(receiver, roots, tmp_path, monkeypatch):
    src = roots[0]
    make_tree(src)
    monkeypatch.setenv("PYTHONPATH", sender_env()["PYTHONPATH"])
    warm = WarmSenders(True)
    warm.start()
    try:
        started = time.monotonic()
        proc, err = start_sender(_node_spec(receiver, src, tmp_path), "n1", 11, str(src), warm)
        assert time.monotonic() - started < 0.3  # the node's loop goes on (heartbeats) while numba loads
        assert isinstance(proc, subprocess.Popen)  # started cold: the zygote was not ready yet
        assert _wait(proc) == 0, err.read_text()
        _wait_loaded(warm)
        proc, err = start_sender(_node_spec(receiver, src, tmp_path), "n1", 12, str(src), warm)
        assert isinstance(proc, ForkedSender) and _wait(proc) == 0
    finally:
        warm.close()


def test_a_zygote_let_go_exits(warm):
    proc = warm.proc
    warm.close()
    assert proc.poll() == 0


def test_a_sender_gets_none_of_the_daemons_secrets(monkeypatch):
    from cm.node import sync

    monkeypatch.setenv("CM_OPERATOR_TOKEN", "s3cret")
    monkeypatch.setenv("CM_HEAD_ADDR", "tcp://head:1")
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/tmp/x")
    env = sync._sender_env()
    assert "CM_OPERATOR_TOKEN" not in env and "s3cret" not in env.values()
    assert not [k for k in env if k.startswith("CM_")]
    assert env["NUMBA_CACHE_DIR"] == "/tmp/x"


def test_a_zygote_that_dies_loading_lets_the_node_register_and_is_not_restarted_in_a_loop(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "executable", "/bin/false")  # a zygote that exits before it says it is ready
    senders = WarmSenders(True)
    senders.start()
    first = senders.proc
    assert first is not None
    first.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not senders.settled() and time.monotonic() < deadline:
        senders.wait_readable(0.05)
    assert senders.settled()  # the node says hello rather than wait for a zygote that cannot load
    senders.start()  # the node's loop asks again at once: no new zygote before RETRY_AFTER
    assert senders.proc is None and senders.settled()
    senders.close()


def test_fifos_planted_where_the_sender_logs_do_not_hold_the_node_up(receiver, roots, tmp_path):
    """The job's user may put a fifo at the paths of its cmlogs/ before the job starts: the node (which
    makes the error log and the report as the user) must not wait on them for a reader."""
    import threading

    src = roots[0]
    write(src / "a.txt", b"a")
    logs = tmp_path / "cmlogs" / "11"
    (logs / "n1").mkdir(parents=True)
    fifos = [logs / "n1" / "0.err", logs / "files-0.jsonl"]
    for fifo in fifos:
        os.mkfifo(fifo)
    started: list = []
    t = threading.Thread(target=lambda: started.append(start_sender(_node_spec(receiver, src, tmp_path), "n1", 11,
                                                                    str(src))), daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # let it go (a reader for each fifo), and its sender, which would wait on them too
        while t.is_alive():
            for fifo in fifos:
                os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
            t.join(0.5)
        started[0][0].kill()
        started[0][0].wait(30)
        pytest.fail("the node waited for a reader of a fifo in the job's cmlogs/")
    assert _wait(started[0][0]) == 0
