"""What a site's syncs really meet (issue 20): stale verification records, overlapping runs, full disks,
live trees, a sender killed by the kernel, user files that look like cm's own.

Trees are compared by ``tree_digest``, a walker of its own (directory descriptors, so paths longer than
PATH_MAX are fine) that reads every byte: it shares nothing with cm's walker or checksums.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest


def tree_digest(top: Path, hidden: bool = True) -> dict:
    """{relative path: (kind, mode, mtime_ns, sha256 or link target)} of every entry under top."""
    out: dict = {}

    def walk(fd: int, prefix: str) -> None:
        for name in sorted(os.listdir(fd)):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            rel = prefix + name
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                try:
                    walk(sub, rel + "/")
                finally:
                    os.close(sub)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(name, dir_fd=fd))
            else:
                h = hashlib.sha256()
                f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
                try:
                    while block := os.read(f, 1 << 20):
                        h.update(block)
                finally:
                    os.close(f)
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, h.hexdigest())

    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        walk(fd, "")
    finally:
        os.close(fd)
    return out


def temporaries(top: Path) -> list[str]:
    """cm's own temporary files left under top."""
    from cm.transfer.tree import is_temp_name

    return sorted(str(p.relative_to(top)) for p in top.rglob(".cm.*") if is_temp_name(p.name))


def _wait(probe, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := probe():
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {what} after {timeout} s")


def _verified_chunks(dst: Path) -> int:
    from cm.transfer.partial import count_verified

    total = 0
    for side in dst.glob(".cm.*.ok") if dst.is_dir() else []:
        try:
            total += count_verified(side.read_bytes())
        except OSError:
            continue
    return total


# ---- item 2: a verification record never vouches for bytes it did not see ----

@pytest.mark.parametrize("lost", ["deleted", "spoiled"])
def test_a_record_whose_part_was_deleted_vouches_for_nothing(make_cluster, lost):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    src, dst = cluster.data_dir / "gpu" / "big", cluster.data_dir / "cpu" / "big"
    src.mkdir(parents=True)
    (src / "one.bin").write_bytes(random.Random(5).randbytes(12 << 20))
    job_id = cluster.submit("cmsync", "--bwlimit", "3M", "gpu:/big", "cpu:/big")
    cluster.wait_state(job_id, "RUNNING")
    _wait(lambda: _verified_chunks(dst) >= 2, what="verified chunks")
    cluster.cli("cmkill", str(job_id))
    cluster.wait_state(job_id, "CANCELLED", timeout=30)
    parts, records = list(dst.glob(".cm.*.part")), list(dst.glob(".cm.*.ok"))
    assert len(parts) == len(records) == 1
    if lost == "spoiled":  # its bytes lost in a crash, same inode: the chunks it records are zeros now
        with open(parts[0], "r+b") as f:
            f.write(bytes(2 << 20))
    else:
        parts[0].unlink()  # an admin freeing room: the record stays behind
        # and the record says what an overlapping run leaves (its chunks at the end, written after the other
        # run published the file): a run that sends the chunks in order trusts them before it rewrites them
        side = bytearray(records[0].read_bytes())
        slots = len(side) - 12 * 16  # the 12 slots of 16 bytes end the record, whatever its head
        for i in range(1, 12):
            side[slots + i * 16 + 8] = 1
        records[0].write_bytes(side)
    again = cluster.job(cluster.submit("cmsync", "--wait", "gpu:/big", "cpu:/big"))
    assert again["state"] == "COMPLETED", again
    assert tree_digest(dst) == tree_digest(src)  # not a single zero-filled chunk
    assert temporaries(dst) == []


def test_overlapping_identical_syncs_never_interleave(make_cluster):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    src, dst = cluster.data_dir / "gpu" / "nightly", cluster.data_dir / "cpu" / "nightly"
    rng = random.Random(11)
    (src / "small").mkdir(parents=True)
    for i in range(4):
        (src / f"big{i}.bin").write_bytes(rng.randbytes(3 << 20))
    for i in range(50):
        (src / "small" / f"f{i}.txt").write_bytes(rng.randbytes(rng.randint(0, 5000)))
    first = cluster.submit("cmsync", "--bwlimit", "4M", "gpu:/nightly", "cpu:/nightly")
    second = cluster.submit("cmsync", "gpu:/nightly", "cpu:/nightly")
    inside = cluster.submit("cmsync", "gpu:/nightly/small", "cpu:/nightly/small")  # inside the same tree
    cluster.wait_state(first, "RUNNING")
    for waiting in (second, inside):
        job = cluster.job(waiting)
        assert job["state"] == "PENDING" and job["reason"] == "DestinationBusy", job
    assert "(DestinationBusy)" in cluster.cli("cminfo").stdout
    elsewhere = cluster.job(cluster.submit("cmsync", "--wait", "gpu:/nightly/small", "cpu:/elsewhere"))
    assert elsewhere["state"] == "COMPLETED"  # another tree is not held back
    for job_id in (first, second, inside):
        job = cluster.wait_state(job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout=120)
        assert job["state"] == "COMPLETED", job
    assert tree_digest(dst) == tree_digest(src)  # same bytes, modes and mtimes: nothing written after publishing
    assert temporaries(dst) == []
    third = cluster.job(cluster.submit("cmsync", "--wait", "gpu:/nightly", "cpu:/nightly"))
    assert third["state"] == "COMPLETED" and third["transfer"]["stats"]["bytes_sent"] == 0


# ---- item 3: temporary files are the sync's to clean; a full disk is reported as itself ----

@pytest.fixture
def small_tmpfs(make_cluster):
    """A cluster whose cpu partition has a 48 MiB file system mounted at /full."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    # one file after the other; chunks larger than what the sockets buffer: the receiver refuses one midway
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=64, streams=1)
    mount = cluster.data_dir / "cpu" / "full"
    mount.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield cluster, mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_destination_is_reported_as_itself_and_left_with_room(small_tmpfs):
    cluster, mount = small_tmpfs
    src = cluster.data_dir / "gpu" / "big"
    src.mkdir(parents=True)
    rng = random.Random(2)
    for i in range(1):
        (src / f"part{i}.bin").write_bytes(rng.randbytes(128 << 20))  # 2 chunks; 128 MiB into 48
    proc = cluster.cli("cmsync", "--parsable", "--wait", "gpu:/big", "cpu:/full/copy", check=False)
    assert proc.returncode != 0
    job = cluster.job(int(proc.stdout.split()[0]))
    assert job["state"] == "FAILED", job
    message = job["transfer"]["message"]
    assert "No space left on device" in message and "part" in message, message
    assert "lost the receiver" not in message and job["transfer"]["retries"] == 0, message  # not a network fault
    assert temporaries(mount) == []  # the file it could not finish does not keep the room
    assert set(cluster.node_states().values()) == {"IDLE"}  # nothing down or drained
    # the node is fine: a sync that fits still works there
    (src / "part0.bin").write_bytes(rng.randbytes(20 << 20))
    free = os.statvfs(mount)
    assert free.f_bavail * free.f_frsize >= 8 << 20
    job = cluster.job(cluster.submit("cmsync", "--delete", "--wait", "gpu:/big", "cpu:/full/copy"))
    assert job["state"] == "COMPLETED", job
    assert tree_digest(mount / "copy") == tree_digest(src)


def test_partial_files_no_run_will_resume_are_removed_and_a_run_tells_what_it_kept(make_cluster):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    src, dst = cluster.data_dir / "gpu" / "data", cluster.data_dir / "cpu" / "data"
    src.mkdir(parents=True)
    (src / "a.bin").write_bytes(random.Random(1).randbytes(8 << 20))
    job_id = cluster.submit("cmsync", "--bwlimit", "2M", "gpu:/data", "cpu:/data")
    sender = cluster.wait_state(job_id, "RUNNING")["nodes"][0]
    _wait(lambda: _verified_chunks(dst) >= 2, what="verified chunks")
    cluster.cli("cmkill", str(job_id))
    cluster.wait_state(job_id, "CANCELLED", timeout=30)
    assert len(temporaries(dst)) == 2  # a cancelled run keeps what the next one resumes, and says how much
    err = (cluster.home / "cmlogs" / str(job_id) / sender / "0.err").read_text()
    assert "terminated; " in err and "MiB of unfinished files kept at the destination for the next run" in err, err
    (src / "a.bin").write_bytes(random.Random(2).randbytes(5 << 20))  # another version: the old part is no use
    (dst / ".cm.notes.ok").write_text("a user's file, not cm's\n")
    job = cluster.job(cluster.submit("cmsync", "--wait", "gpu:/data", "cpu:/data"))
    assert job["state"] == "COMPLETED", job
    assert temporaries(dst) == [] and (dst / ".cm.notes.ok").exists()
    assert (dst / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    # a run that loses its receiver halfway says what it kept for the next one
    (src / "b.bin").write_bytes(random.Random(3).randbytes(8 << 20))
    job_id = cluster.submit("cmsync", "--bwlimit", "2M", "gpu:/data", "cpu:/data")
    job = cluster.wait_state(job_id, "RUNNING")
    _wait(lambda: _verified_chunks(dst) >= 2, what="verified chunks")
    sender = [n for n in job["nodes"] if n in ("computenode-1", "computenode-2")][0]
    cluster.kill([n for n in job["nodes"] if n in ("computenode-3", "computenode-4")][0], signal.SIGKILL)
    job = cluster.wait_state(job_id, ("COMPLETED", "FAILED", "NODE_FAIL"), timeout=90)
    assert job["state"] == "COMPLETED", job
    err = (cluster.home / "cmlogs" / str(job_id) / sender / "0.err").read_text()
    assert "MiB of unfinished files kept at the destination for the next run" in err, err
    assert temporaries(dst) == []


# ---- item 4: partial success like rsync's ----

def _deep_file(top: Path, levels: int = 21) -> str:
    """A file under a path longer than PATH_MAX (4096), made relative to directory descriptors."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    names = []
    for i in range(levels):
        name = f"{i:02d}" + "d" * 198
        os.mkdir(name, dir_fd=fd)
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
        names.append(name)
    out = os.open("deep.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(out, b"at the bottom\n")
    os.close(out)
    os.close(fd)
    path = "/".join(names + ["deep.txt"])
    assert len(path) > 4096
    return path


def test_a_path_longer_than_path_max_is_copied_with_the_rest(make_cluster):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    src, dst = cluster.data_dir / "gpu" / "tree", cluster.data_dir / "cpu" / "tree"
    src.mkdir(parents=True)
    for i in range(16):
        (src / f"f{i:02d}.txt").write_text(f"file {i}\n")
    _deep_file(src)
    job = cluster.job(cluster.submit("cmsync", "--wait", "gpu:/tree", "cpu:/tree", check=False))
    assert job["state"] == "COMPLETED" and job["exit_code"] == 0, job
    assert tree_digest(dst) == tree_digest(src)


def test_a_live_tree_is_copied_and_what_moved_is_named(make_cluster):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=4, streams=1)  # in order: chunks, then batches
    src, dst = cluster.data_dir / "gpu" / "live", cluster.data_dir / "cpu" / "live"
    src.mkdir(parents=True)
    rng = random.Random(4)
    (src / "a-shrinks.bin").write_bytes(rng.randbytes(8 << 20))  # 2 chunks, 2 s each: cut short mid-chunk
    (src / "b-whole.bin").write_bytes(rng.randbytes(2 << 20))
    for i in range(12):
        (src / f"c{i:02d}.txt").write_bytes(rng.randbytes(2000))
    (src / "d-gone.txt").write_text("deleted before it is read\n")
    log = src / "e-live.log"
    log.write_text("start\n")
    stop = threading.Event()

    def append() -> None:
        n = 0
        while not stop.is_set():
            with open(log, "a") as f:
                f.write(f"line {n}\n")
            n += 1
            time.sleep(0.05)

    writer = threading.Thread(target=append, daemon=True)
    writer.start()
    try:
        job_id = cluster.submit("cmsync", "--bwlimit", "2M", "gpu:/live", "cpu:/live")
        cluster.wait_state(job_id, "RUNNING")
        # its second chunk on its way (bytes_done counts a piece once it is read, before it is paced and sent)
        _wait(lambda: (cluster.job(job_id)["transfer"] or {}).get("bytes_done", 0) >= 9 << 19, what="progress")
        os.truncate(src / "a-shrinks.bin", 5 << 20)
        (src / "d-gone.txt").unlink()
        job = cluster.wait_state(job_id, ("COMPLETED", "FAILED"), timeout=90)
    finally:
        stop.set()
        writer.join()
    assert job["state"] == "COMPLETED" and job["exit_code"] == 24, (job["exit_code"], job["reason"])  # rsync 24
    assert "copied all but 2 files" in job["transfer"]["message"], job
    err = (cluster.home / "cmlogs" / str(job_id) / job["nodes"][0] / "0.err").read_text()
    assert "d-gone.txt: vanished" in err, err
    assert "a-shrinks.bin: was cut short while being read" in err or "a-shrinks.bin: changed while being" in err, err
    want, got = tree_digest(src), tree_digest(dst)
    for name in ["b-whole.bin"] + [f"c{i:02d}.txt" for i in range(12)]:
        assert got[name] == want[name], name
    assert "d-gone.txt" not in got and "a-shrinks.bin" not in got  # no torn file is published
    copied = (dst / "e-live.log").read_text()
    assert copied.startswith("start\n") and log.read_text().startswith(copied)  # a snapshot of the log
    assert temporaries(dst) == []


# ---- item 5: a sender killed by the kernel; user files that look like cm's ----

def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def _senders_of(cluster) -> list[int]:
    """Pids of sync senders running under this cluster's node daemons (forked from zygotes)."""
    mine = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"cm.transfer.send" in argv and b"--zygote" in argv:
            try:
                zygote = _parent(int(entry))
                if b"--zygote" in Path(f"/proc/{zygote}/cmdline").read_bytes().split(b"\0") and \
                        str(cluster.run_dir).encode() in Path(f"/proc/{_parent(zygote)}/environ").read_bytes():
                    mine.append(int(entry))  # a fork of one of this cluster's zygotes: a sender with its job
            except (OSError, ValueError):
                continue
    return mine


def test_a_sender_killed_by_the_kernel_says_so(make_cluster):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    src = cluster.data_dir / "gpu" / "slow"
    src.mkdir(parents=True)
    (src / "big.bin").write_bytes(random.Random(9).randbytes(8 << 20))
    job_id = cluster.submit("cmsync", "--bwlimit", "1M", "gpu:/slow", "cpu:/slow")
    cluster.wait_state(job_id, "RUNNING")
    pids = _wait(lambda: _senders_of(cluster), what="sender")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # what the OOM killer does
    job = cluster.wait_state(job_id, ("COMPLETED", "FAILED"), timeout=30)
    assert job["state"] == "FAILED" and job["exit_code"] == 137, job
    assert "killed by signal 9" in job["reason"] and "out of memory" in job["reason"], job


def test_user_files_named_like_cms_temporaries_are_synced_once(make_cluster):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    src, dst = cluster.data_dir / "gpu" / "home", cluster.data_dir / "cpu" / "home"
    src.mkdir(parents=True)
    for name in (".cm.notes.tmp", ".cm.draft.part", ".cm.ok", ".cm.x.ok", "plain.txt"):
        (src / name).write_text(f"the user's {name}\n")
    first = cluster.job(cluster.submit("cmsync", "--wait", "gpu:/home", "cpu:/home"))
    assert first["state"] == "COMPLETED"
    assert tree_digest(dst) == tree_digest(src)
    again = cluster.job(cluster.submit("cmsync", "--delete", "--wait", "gpu:/home", "cpu:/home"))
    assert again["state"] == "COMPLETED"
    assert again["transfer"]["stats"]["bytes_sent"] == 0 and again["transfer"]["files_skipped"] == 5, again
    assert tree_digest(dst) == tree_digest(src)


def test_the_scheduler_holds_a_sync_whose_destination_tree_is_being_written():
    from cm.head.policies import FirstFit
    from cm.head.resources import Demand, NodeView, Request, Running, Writes
    from cm.head.scheduler import Scheduler

    nodes = {n: NodeView(n, p, 4, 1000) for n, p in (("g1", "gpu"), ("c1", "cpu"), ("c2", "cpu"))}

    def sync(i, path, node="", partition="cpu"):
        return Request(i, 0, float(i), 100.0, (Demand("src", 1, 1, 0, partition="gpu"),
                                               Demand("dst", 1, 1, 0, partition="cpu")),
                       Writes("" if node else partition, node, path))

    running = [Running(1, 100.0, [("g1", 1, 0), ("c1", 1, 0)], Writes("cpu", "", "data/nightly"))]
    pending = [sync(2, "data/nightly"), sync(3, "data/nightly/sub"), sync(4, "data"), sync(5, "", node="c2"),
               sync(6, "data/nightly2"), sync(7, "data/nightly", partition="gpu"), sync(8, "other"),
               sync(9, "other/x")]
    scheduler = Scheduler(FirstFit())
    started = [r.job_id for r, _ in scheduler.plan(pending, nodes, running, 0.0)]
    assert started == [6, 7, 8]  # another tree, another storage; 9 is inside 8, which starts in this pass
    assert {i: scheduler.reasons[i] for i in (2, 3, 4, 5, 9)} == dict.fromkeys((2, 3, 4, 5, 9), "DestinationBusy")


def test_wait_exits_with_a_completed_syncs_24():
    from cm.api.views import exit_code_of

    assert exit_code_of({"state": "COMPLETED", "exit_code": 0}) == 0
    assert exit_code_of({"state": "COMPLETED", "exit_code": 24}) == 24  # copied all but files that vanished
    assert exit_code_of({"state": "FAILED", "exit_code": 23}) == 23
    assert exit_code_of({"state": "FAILED", "exit_code": None}) == 1


def test_a_part_is_never_written_once_published(tmp_path):
    import fcntl

    from cm.transfer.destination import _open_part

    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        writer = _open_part(dfd, "x.part")  # a receiver inside it, writing a chunk: shared lock
        publisher = os.open("x.part", os.O_RDWR, dir_fd=dfd)
        with pytest.raises(BlockingIOError):  # whoever publishes waits for the writers to leave
            fcntl.flock(publisher, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(writer)
        fcntl.flock(publisher, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename("x.part", "x", src_dir_fd=dfd, dst_dir_fd=dfd)  # published
        os.close(publisher)
        late = _open_part(dfd, "x.part")  # a writer that comes late gets a part of its own, not the file
        assert os.fstat(late).st_ino != os.stat("x", dir_fd=dfd).st_ino
        os.close(late)
    finally:
        os.close(dfd)
