"""Sync jobs through the whole cluster: cmsync, scheduler, node daemons, the mover."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest


def make_tree(root: Path, big: int = 3 << 20, small: int = 300) -> None:
    rng = random.Random(7)
    (root / "deep" / "er").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "big.bin").write_bytes(rng.randbytes(big))
    for i in range(small):
        (root / "deep" / f"f{i:04d}.txt").write_bytes(rng.randbytes(rng.randint(0, 9000)))
    (root / "deep" / "er" / "ünïcødé ✓.txt").write_text("names in any UTF-8\n")
    (root / "empty").write_bytes(b"")
    os.symlink("big.bin", root / "link")
    secret = root / "secret"
    secret.write_text("mode 600\n")
    secret.chmod(0o600)
    os.utime(root / "big.bin", (1_600_000_000, 1_600_000_000))


def snapshot(root: Path) -> dict:
    """Every path under root with its owner, group, mode, nanosecond mtime (files, directories and links),
    link target and content: walked with os.lstat, not with cm's walker."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        common = (st.st_uid, st.st_gid, oct(st.st_mode), st.st_mtime_ns)
        if path.is_symlink():
            out[rel] = ("link", *common, os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", *common)
        else:
            out[rel] = ("file", *common, path.read_bytes())
    return out


@pytest.fixture
def synced(make_cluster):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    src = cluster.data_dir / "gpu" / "proj"
    make_tree(src)
    return cluster, src, cluster.data_dir / "cpu" / "copy"


def test_a_sync_job_copies_a_tree_exactly(synced):
    cluster, src, dst = synced
    job_id = cluster.submit("cmsync", "--wait", "gpu:/proj", "cpu:/copy")
    job = cluster.job(job_id)
    assert job["state"] == "COMPLETED" and job["type"] == "sync" and job["progress"] == 100
    assert snapshot(dst) == snapshot(src)
    assert job["transfer"]["bytes_done"] >= 3 << 20
    sender_log = cluster.home / "cmlogs" / str(job_id) / job["nodes"][0] / "0.err"
    assert sender_log.exists()  # the sender's messages land with the job's output, in the submit directory


def test_two_nodes_per_side_share_the_work_and_a_rerun_sends_nothing(synced):
    cluster, src, dst = synced
    job_id = cluster.submit("cmsync", "-n", "2", "--wait", "gpu:/proj", "cpu:/copy")
    job = cluster.job(job_id)
    assert job["state"] == "COMPLETED"
    assert sorted(job["nodes"]) == ["computenode-1", "computenode-2", "computenode-3", "computenode-4"]
    assert snapshot(dst) == snapshot(src)
    again = cluster.submit("cmsync", "-n", "2", "--wait", "gpu:/proj", "cpu:/copy")
    assert cluster.job(again)["transfer"]["stats"]["bytes_sent"] == 0


def test_dry_run_changes_nothing_and_delete_removes_extras(synced):
    cluster, src, dst = synced
    dst.mkdir(parents=True)
    (dst / "extra.txt").write_text("not in the source\n")
    cluster.submit("cmsync", "--dry-run", "--delete", "--wait", "gpu:/proj", "cpu:/copy")
    assert [p.name for p in dst.iterdir()] == ["extra.txt"]
    cluster.submit("cmsync", "--delete", "--exclude", "*.bin", "--wait", "gpu:/proj", "cpu:/copy")
    assert not (dst / "extra.txt").exists()
    assert not (dst / "big.bin").exists() and (dst / "deep" / "f0001.txt").exists()
    # like rsync, what is excluded is also kept from deletion
    (dst / "keep.bin").write_text("excluded, so not deleted\n")
    cluster.submit("cmsync", "--delete", "--exclude", "*.bin", "--wait", "gpu:/proj", "cpu:/copy")
    assert (dst / "keep.bin").exists()


def test_paths_that_escape_the_partition_are_refused_at_submit(synced):
    cluster, _, _ = synced
    for bad in ("gpu:/../../etc", "gpu:../x", "nowhere:/x", "gpu"):
        proc = cluster.cli("cmsync", bad, "cpu:/copy", check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, bad
    assert cluster.info()["jobs"] == []


def test_a_symlinked_directory_leading_outside_fails_the_job_and_writes_nothing(synced, tmp_path):
    cluster, _, _ = synced
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, cluster.data_dir / "cpu" / "escape")
    proc = cluster.cli("cmsync", "--wait", "gpu:/proj", "cpu:/escape/inside", check=False)
    assert proc.returncode != 0
    assert list(outside.iterdir()) == []


def test_rdma_without_a_device_is_refused_with_the_reason(synced):
    cluster, _, _ = synced
    proc = cluster.cli("cmsync", "--transport", "rdma", "gpu:/proj", "cpu:/copy", check=False)
    assert proc.returncode != 0 and "rdma is not available" in proc.stderr


def test_bwlimit_is_the_whole_jobs_rate_whatever_its_number_of_nodes(make_cluster):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    src = cluster.data_dir / "gpu" / "limited"
    src.mkdir(parents=True)
    for i in range(4):
        (src / f"part{i}.bin").write_bytes(random.Random(i).randbytes(4 << 20))  # 16 MiB over both senders
    job_id = cluster.submit("cmsync", "-n", "2", "--bwlimit", "2M", "--wait", "gpu:/limited", "cpu:/limited",
                            timeout=120)
    job = cluster.job(job_id)
    assert job["state"] == "COMPLETED" and len(job["nodes"]) == 4, job
    assert job["transfer"]["bytes_done"] == 16 << 20
    # 2 MiB/s for the job: 7 s at least (a sender's first 1 MiB chunk leaves at once; a slow machine only
    # takes longer); at 2 MiB/s per node it took 3.6 s
    assert job["elapsed"] >= 0.9 * ((16 << 20) - 2 * (1 << 20)) / (2 << 20), job


def test_cmkill_stops_a_sync_job(synced):
    cluster, src, _ = synced
    job_id = cluster.submit("cmsync", "--bwlimit", "200K", "gpu:/proj", "cpu:/copy")
    cluster.wait_state(job_id, "RUNNING")
    cluster.cli("cmkill", str(job_id))
    cluster.wait_state(job_id, "CANCELLED", timeout=15)


def test_a_node_killed_mid_sync_leaves_the_rest_to_finish_it(make_cluster):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    src = cluster.data_dir / "gpu" / "big"
    src.mkdir(parents=True)
    rng = random.Random(3)
    for i in range(4):
        (src / f"part{i}.bin").write_bytes(rng.randbytes(6 << 20))
    dst = cluster.data_dir / "cpu" / "big"
    job_id = cluster.submit("cmsync", "-n", "2", "--bwlimit", "3M", "gpu:/big", "cpu:/big")
    job = cluster.wait_state(job_id, "RUNNING")
    # both senders half way through a file: the victim's has verified chunks that must not be sent again
    assert _wait_for(lambda: sum(1 for verified in _sidecars(dst) if verified) >= 2, timeout=60), _sidecars(dst)
    victim = [n for n in job["nodes"] if n in ("computenode-1", "computenode-2")][1]
    cluster.kill(victim, signal.SIGKILL)
    kept = sum(p.stat().st_size for p in dst.iterdir() if p.name.startswith("part")) + sum(_sidecars(dst)) * (1 << 20)
    job = cluster.wait_state(job_id, ("COMPLETED", "FAILED", "NODE_FAIL"), timeout=90)
    assert job["state"] == "COMPLETED", job
    assert victim not in job["nodes"] and len(job["nodes"]) == 2
    assert snapshot(dst) == snapshot(src)
    stats = job["transfer"]["stats"]  # of the last run, the one started again on what remained
    assert "restarting" in job["transfer"]["message"] or job["transfer"]["retries"] >= 1, job
    assert stats["chunks_resumed"] >= 1, stats  # the victim's half-sent file was resumed, not sent again
    assert 0 < stats["bytes_sent"] <= (24 << 20) - kept, (stats, kept)  # nothing verified before was resent


def _movers_of(node_pid: int) -> list[int]:
    return [pid for pid in _children().get(node_pid, [])
            if b"cm.transfer.receiver" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_a_mover_killed_mid_sync_is_started_again_and_the_rerun_sends_only_what_was_not_verified(make_cluster):
    cluster = make_cluster("gpu:1,cpu:1", nodes=2, chunk_mb=1)
    src = cluster.data_dir / "gpu" / "big"
    src.mkdir(parents=True)
    (src / "one.bin").write_bytes(random.Random(9).randbytes(12 << 20))
    dst = cluster.data_dir / "cpu" / "big"
    receiver = cluster.procs["computenode-2"]
    [mover] = _movers_of(receiver.pid)
    job_id = cluster.submit("cmsync", "--bwlimit", "3M", "gpu:/big", "cpu:/big")
    cluster.wait_state(job_id, "RUNNING")
    _wait_verified_chunks(dst, 2)
    os.kill(mover, signal.SIGKILL)
    kept = sum(_sidecars(dst)) << 20  # only grows after this
    assert kept >= 2 << 20
    job = cluster.wait_state(job_id, ("COMPLETED", "FAILED", "NODE_FAIL"), timeout=90)
    assert job["state"] == "COMPLETED", (job["reason"], job["transfer"], cluster.tail("computenode-2", 30))
    assert snapshot(dst) == snapshot(src)
    # the sender that lost its receiver exited "try again" and the head ran the sync again (not a lost node)
    assert job["transfer"]["message"].startswith("restarting: computenode-1"), job["transfer"]["message"]
    stats = job["transfer"]["stats"]
    assert stats["chunks_resumed"] >= 2, stats
    assert 0 < stats["bytes_sent"] <= (12 << 20) - kept, (stats, kept)  # only what was not verified
    assert receiver.poll() is None and cluster.node_states()["computenode-2"] != "DOWN"  # the node stayed up
    [again] = _movers_of(receiver.pid)
    assert again != mover
    assert "mover died; starting it again" in cluster.logfile("computenode-2").read_text()


def test_a_restarted_mover_registers_the_live_transfers_again(tmp_path):
    import json
    import subprocess
    import sys

    from cm.creds import Identity
    from cm.node.mover import Mover

    src, root = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    root.mkdir()
    make_tree(src, big=1 << 20, small=20)
    mover = Mover("127.0.0.1", 0, chunk_size=1 << 20)
    mover.start()
    try:
        mover.register("t-live", "tok", root, "/copy", Identity(0, 0, ()))
        first = mover.proc
        first.kill()
        first.wait()
        deadline = time.monotonic() + 60
        while mover.starts < 2:  # as the node daemon's supervisor does, a few times a second
            assert time.monotonic() < deadline, "the mover was not started again"
            mover.check()
            time.sleep(0.1)
        assert mover.proc is not first and mover.proc.poll() is None
        spec = {"transfer_id": "t-live", "token": "tok", "src_root": str(src), "src_path": "/",
                "dst_host": "127.0.0.1", "dst_port": mover.port, "rank": 0, "nranks": 1, "policy": "round-robin",
                "delete": False, "dry_run": False, "checksum": False, "exclude": [], "bwlimit": None,
                "streams": 2, "chunk_size": 1 << 20}
        sent = subprocess.run([sys.executable, "-m", "cm.transfer.send"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr  # the transfer registered before the crash is known to the new one
        assert snapshot(root / "copy") == snapshot(src)
    finally:
        mover.stop()


def _sidecars(dst: Path) -> list[int]:
    """The number of verified chunks each partially received file in dst has recorded."""
    from cm.transfer.partial import count_verified

    out = []
    for side in dst.glob(".cm.*.ok") if dst.is_dir() else []:
        try:
            out.append(count_verified(side.read_bytes()))
        except OSError:
            continue  # published meanwhile
    return out


def test_a_destination_killed_mid_sync_costs_only_the_unverified_parts(make_cluster):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    src = cluster.data_dir / "gpu" / "big"
    src.mkdir(parents=True)
    (src / "one.bin").write_bytes(random.Random(5).randbytes(12 << 20))
    job_id = cluster.submit("cmsync", "--bwlimit", "3M", "gpu:/big", "cpu:/big")
    job = cluster.wait_state(job_id, "RUNNING")
    _wait_verified_chunks(cluster.data_dir / "cpu" / "big", 2)  # not a fixed sleep: a busy machine starts late
    receiver = [n for n in job["nodes"] if n in ("computenode-3", "computenode-4")][0]
    cluster.kill(receiver, signal.SIGKILL)
    job = cluster.wait_state(job_id, ("COMPLETED", "FAILED", "NODE_FAIL"), timeout=90)
    assert job["state"] == "COMPLETED", job
    assert snapshot(cluster.data_dir / "cpu" / "big") == snapshot(src)
    sent_by_last_run = job["transfer"]["stats"]["bytes_sent"]
    assert 0 < sent_by_last_run < 12 << 20  # the chunks verified before the kill were not sent again


def _wait_verified_chunks(dst: Path, count: int, timeout: float = 60) -> None:
    """Wait until the sidecar of a file being received in dst records ``count`` verified chunks."""
    from cm.transfer.partial import count_verified

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for side in dst.glob(".cm.*.ok") if dst.is_dir() else []:
            try:
                if count_verified(side.read_bytes()) >= count:
                    return
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no {count} verified chunks in {dst} after {timeout} s")


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def _zygotes_under(pid: int) -> set[int]:
    """Zygotes (``cm.transfer.send --zygote``) among the descendants of ``pid``."""
    children = _children()
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"cm.transfer.send" in argv and b"--zygote" in argv:
                found.add(child)
    return found


def _wait_for(probe, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (found := probe()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_a_node_registers_once_its_zygote_is_loaded_and_forks_every_sender_from_it(make_cluster):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    src = cluster.data_dir / "gpu" / "slow"
    src.mkdir(parents=True)
    (src / "one.bin").write_bytes(os.urandom(3 << 20))
    # the nodes are up (the head knows them): each has its zygote loaded already, so the very
    # first sync on the new cluster is forked, not started cold beside a loading zygote
    zygotes = {name: _zygotes_under(proc.pid) for name, proc in cluster.procs.items() if name != "headnode"}
    assert all(len(z) == 1 for z in zygotes.values()), zygotes
    for name, (pid,) in zygotes.items():
        assert f'"sender zygote ready", "pid": {pid}' in cluster.logfile(name).read_text(), name
    job_id = cluster.submit("cmsync", "--bwlimit", "1M", "gpu:/slow", "cpu:/slow")
    job = cluster.wait_state(job_id, "RUNNING")
    source = job["nodes"][0]
    (zygote,) = zygotes[source]
    assert _wait_for(lambda: _children().get(zygote))  # the sender is the zygote's child
    job = cluster.wait_state(job_id, ("COMPLETED", "FAILED"), timeout=60)
    assert job["state"] == "COMPLETED", job
    assert snapshot(cluster.data_dir / "cpu" / "slow") == snapshot(src)
    assert _zygotes_under(cluster.procs[source].pid) == {zygote}  # one zygote serves every sync
    cluster.down()  # the daemon lets its zygote go
    assert _wait_for(lambda: not Path(f"/proc/{zygote}").exists(), timeout=10)


def test_the_commands_usual_runs_load_neither_click_nor_msgspec(synced):
    """What keeps a command's start and answer near 25 ms (bench/bench_commands.py times them): the usual
    command lines are read without click, and the head is asked without msgspec, cm.protocol or cm.config.
    PYTHONPROFILEIMPORTTIME makes Python list every module a command loads."""
    cluster, _, dst = synced

    def loads(*argv):
        proc = cluster.cli(*argv, env={"PYTHONPROFILEIMPORTTIME": "1"})
        return proc, {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}

    heavy = {"click", "msgspec", "cm.protocol", "cm.config", "typing", "socket", "pymongo", "zmq", "numba"}
    job_id = int(loads("cmsync", "--parsable", "--wait", "--exclude", "*.tmp", "gpu:/proj", "cpu:/copy")[0].stdout)
    assert cluster.job(job_id)["state"] == "COMPLETED" and dst.is_dir()
    sleeper = cluster.submit("cmrun", "sleep", "60")
    for argv in (["cminfo"], ["cminfo", str(job_id)], ["cmrun", "--wait", "-n", "2", "true"], ["cmkill", str(sleeper)],
                 ["cmsync", "--wait", "gpu:/proj", "cpu:/copy"], ["cmtoken"]):
        proc, modules = loads(*argv)
        assert "cm.cli.client" in modules and not heavy & modules, (argv, heavy & modules)
    proc, modules = loads("cminfo", "--help")
    assert "click" in modules and "Usage: cminfo" in proc.stdout  # click still reads what is not usual
