"""A sync keeps everything a site's tree holds, as ``rsync -aHAXS`` would, compared with rsync itself.

Each test makes a tree with ``treegen`` (hard links, xattrs, ACLs, a sparse
file, a fifo, a socket, odd names, a deep path, a read-only directory),
syncs it through a real cluster, and asks the peer tools what still differs.
Root's syncs and a real user's (made with useradd), one node a side and two,
the destination on disk and on a tmpfs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

import treegen
from conftest import call_as

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}
USER = "cmt_keeper"

pytestmark = pytest.mark.skipif(bool(treegen.tools_missing()), reason=f"needs {treegen.tools_missing()}")


@pytest.fixture(scope="module")
def keeper():
    """A real user of its own, removed after the module (kept if it was there before)."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to make a user")
    try:
        pwd.getpwnam(USER)
        made = False
    except KeyError:
        proc = subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", USER], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"useradd {USER} failed: {proc.stderr.strip()}")
        made = True
    yield pwd.getpwnam(USER)
    if made:
        subprocess.run(["userdel", USER], capture_output=True)


@pytest.fixture
def tmpfs_dst(make_cluster):
    """A cluster whose cpu partition's storage is a small tmpfs of its own (unmounted after)."""
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    target = cluster.data_dir / "cpu"
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", "tmpfs", str(target)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    yield cluster
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _sync(cluster, src: str, dst: str, nodes: int, user=None, **options) -> dict:
    if user is None:
        job_id = cluster.submit("cmsync", "-n", str(nodes), "--wait", src, dst, check=False)
        return cluster.job(job_id)
    home = cluster.home / user.pw_name
    home.mkdir(exist_ok=True)
    os.chown(home, user.pw_uid, user.pw_gid)
    ok, data = call_as(user.pw_uid, user.pw_gid, cluster.run_dir, "submit", job=dict(
        kind="sync", src=src, dst=dst, nodes=nodes, cwd=str(home), options=options))
    assert ok, data
    return cluster.wait_state(data["job_id"], FINAL, timeout=90)


def _check(cluster, job: dict, src: Path, dst: Path, xattrs: bool = True) -> None:
    assert job["state"] == "COMPLETED", (job["reason"], job["transfer"], cluster.tail("computenode-3", 20), cluster.tail("computenode-4", 20))
    found = treegen.differences(src, dst)
    if not xattrs:  # the destination cannot hold them: the job must say so instead
        found = [d for d in found if not d.startswith(("getfattr", "getfacl")) and "X" not in d.split()[1][:11]]
    assert found == [], "\n".join(found)


def _tree(cluster, part: str, name: str, owner=None, readonly: bool = True) -> Path:
    top = cluster.data_dir / part / name
    treegen.make_site_tree(top, sparse_bytes=64 << 20, owner=owner, readonly=readonly)
    return top


def _owned_dir(path: Path, user) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, user.pw_uid, user.pw_gid)


def test_a_root_sync_keeps_everything_on_disk_with_one_node(make_cluster):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    src = _tree(cluster, "gpu", "site")
    job = _sync(cluster, "gpu:/site", "cpu:/copy", 1)
    _check(cluster, job, src, cluster.data_dir / "cpu" / "copy")
    again = _sync(cluster, "gpu:/site", "cpu:/copy", 1)
    assert again["transfer"]["stats"]["bytes_sent"] == 0, again
    _check(cluster, again, src, cluster.data_dir / "cpu" / "copy")


def test_a_root_sync_keeps_everything_on_tmpfs_with_two_nodes(tmpfs_dst):
    cluster = tmpfs_dst
    src = _tree(cluster, "gpu", "site")
    job = _sync(cluster, "gpu:/site", "cpu:/copy", 2)
    _check(cluster, job, src, cluster.data_dir / "cpu" / "copy",
           xattrs=treegen.user_xattrs_supported(cluster.data_dir / "cpu"))


def test_a_users_sync_keeps_everything_with_two_nodes_on_disk(make_cluster, keeper):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    for part in ("gpu", "cpu"):
        _owned_dir(cluster.data_dir / part / USER, keeper)
    src = _tree(cluster, "gpu", f"{USER}/site", owner=(keeper.pw_uid, keeper.pw_gid))
    job = _sync(cluster, f"gpu:/{USER}/site", f"cpu:/{USER}/copy", 2, user=keeper)
    dst = cluster.data_dir / "cpu" / USER / "copy"
    _check(cluster, job, src, dst)
    assert os.lstat(dst / "a" / "one.txt").st_uid == keeper.pw_uid


def test_a_users_sync_keeps_everything_on_tmpfs_with_one_node(tmpfs_dst, keeper):
    cluster = tmpfs_dst
    for part in ("gpu", "cpu"):
        _owned_dir(cluster.data_dir / part / USER, keeper)
    src = _tree(cluster, "gpu", f"{USER}/site", owner=(keeper.pw_uid, keeper.pw_gid))
    job = _sync(cluster, f"gpu:/{USER}/site", f"cpu:/{USER}/copy", 1, user=keeper)
    _check(cluster, job, src, cluster.data_dir / "cpu" / USER / "copy",
           xattrs=treegen.user_xattrs_supported(cluster.data_dir / "cpu"))


@pytest.fixture
def ramfs_dst(make_cluster):
    """A cluster whose cpu partition's storage is a ramfs: a file system without xattrs or ACLs."""
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    target = cluster.data_dir / "cpu"
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a ramfs: {proc.stderr.strip()}")
    yield cluster
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _small_tree(top: Path) -> Path:
    (top / "d").mkdir(parents=True)
    (top / "d" / "a.txt").write_bytes(b"a\n")
    os.link(top / "d" / "a.txt", top / "d" / "b.txt")
    os.setxattr(top / "d" / "a.txt", "user.project", b"alpha")
    (top / "d" / "acl.txt").write_bytes(b"acl\n")
    subprocess.run(["setfacl", "-m", "u:nobody:r", str(top / "d" / "acl.txt")], check=True)
    os.mkfifo(top / "fifo")
    return top


def _report(cluster, job_id: int) -> list[dict]:
    from cm.api.client import Client

    page = Client(str(cluster.run_dir / "api.sock"), timeout=30).files(job_id, limit=10000)
    assert page["next"] is None
    return page["files"]


def test_what_the_destination_cannot_hold_is_a_counted_reported_skip(ramfs_dst):
    cluster = ramfs_dst
    _small_tree(cluster.data_dir / "gpu" / "small")
    proc = cluster.cli("cmsync", "--wait", "gpu:/small", "cpu:/copy")
    job_id = int(proc.stdout.split()[-1])
    job = cluster.job(job_id)
    assert job["state"] == "COMPLETED", job
    skipped = [line for line in _report(cluster, job_id) if line["action"] == "skipped"]
    assert {line["path"] for line in skipped} == {"d/a.txt", "d/acl.txt"}, skipped
    assert all("cannot hold" in line["reason"] for line in skipped)
    assert job["transfer"]["skipped"] == len(skipped)
    assert f"COMPLETED with {len(skipped)} skipped: see cminfo {job_id} --files" in proc.stderr
    details = cluster.cli("cminfo", str(job_id)).stdout
    assert f"NOT COPIED: {len(skipped)}" in details and "d/acl.txt" in details
    listing = cluster.cli("cminfo", str(job_id), "--files").stdout
    assert "skipped  d/a.txt: extended attribute user.project: the destination cannot hold it" in listing
    copy = cluster.data_dir / "cpu" / "copy"
    assert os.stat(copy / "d" / "a.txt").st_ino == os.stat(copy / "d" / "b.txt").st_ino
    assert (copy / "fifo").is_fifo()


def test_the_report_names_every_change_and_a_dry_run_reports_what_it_would_do(make_cluster, keeper):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    for part in ("gpu", "cpu"):
        _owned_dir(cluster.data_dir / part / USER, keeper)
    src = _small_tree(cluster.data_dir / "gpu" / USER / "small")
    os.mknod(src / "null", 0o666 | 0o020000, os.makedev(1, 3))  # a device: not a user's to make
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    for dirpath, dirnames, filenames in os.walk(src):
        for name in [*dirnames, *filenames, "."]:
            os.chown(os.path.join(dirpath, name), keeper.pw_uid, keeper.pw_gid, follow_symlinks=False)
    dry = _sync(cluster, f"gpu:/{USER}/small", f"cpu:/{USER}/copy", 1, user=keeper, dry_run=True)
    assert dry["state"] == "COMPLETED"
    assert not (cluster.data_dir / "cpu" / USER / "copy").exists()
    would = _report(cluster, dry["id"])
    assert all(line["dry_run"] for line in would)
    assert {line["path"] for line in would if line["action"] == "created"} >= {"d/a.txt", "d/b.txt", "fifo", "big.bin"}
    job = _sync(cluster, f"gpu:/{USER}/small", f"cpu:/{USER}/copy", 1, user=keeper)
    assert job["state"] == "COMPLETED" and job["transfer"]["skipped"] == 1, job
    lines = {line["path"]: line for line in _report(cluster, job["id"])}
    assert lines["null"]["action"] == "skipped" and "root's and operators'" in lines["null"]["reason"]
    assert lines["d/b.txt"] == {"action": "created", "path": "d/b.txt", "kind": "f", "link": "d/a.txt"}
    assert lines["d/a.txt"]["xxh3"] and lines["fifo"]["kind"] == "p"
    assert len(lines["big.bin"]["chunks_xxh3"]) == 3
    report_file = cluster.home / USER / "cmlogs" / str(job["id"]) / "files-0.jsonl"
    assert report_file.stat().st_uid == keeper.pw_uid
    (src / "d" / "a.txt").write_bytes(b"changed\n")
    again = _sync(cluster, f"gpu:/{USER}/small", f"cpu:/{USER}/copy", 1, user=keeper)
    changed = {line["path"]: line["action"] for line in _report(cluster, again["id"])}
    assert changed == {"d/a.txt": "updated", "d/b.txt": "updated", "null": "skipped"}, changed  # b: linked again


def test_each_kept_thing_can_be_turned_off(make_cluster):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    _small_tree(cluster.data_dir / "gpu" / "small")
    job_id = cluster.submit("cmsync", "--wait", "--no-hard-links", "--no-xattrs", "--no-acls", "-aHAXS",
                            "gpu:/small", "cpu:/copy")
    assert cluster.job(job_id)["state"] == "COMPLETED"
    copy = cluster.data_dir / "cpu" / "copy" / "d"
    assert os.stat(copy / "a.txt").st_ino != os.stat(copy / "b.txt").st_ino
    assert os.listxattr(copy / "a.txt") == [] and os.listxattr(copy / "acl.txt") == []
