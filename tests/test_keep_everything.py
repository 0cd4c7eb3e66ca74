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


def _sync(cluster, src: str, dst: str, nodes: int, user=None) -> dict:
    if user is None:
        job_id = cluster.submit("cmsync", "-n", str(nodes), "--wait", src, dst, check=False)
        return cluster.job(job_id)
    home = cluster.home / user.pw_name
    home.mkdir(exist_ok=True)
    os.chown(home, user.pw_uid, user.pw_gid)
    ok, data = call_as(user.pw_uid, user.pw_gid, cluster.run_dir, "submit", kind="sync", src=src, dst=dst,
                       nodes=nodes, cwd=str(home), options={})
    assert ok, data
    return cluster.wait_state(data["job_id"], FINAL, timeout=90)


def _check(cluster, job: dict, src: Path, dst: Path, xattrs: bool = True) -> None:
    assert job["state"] == "COMPLETED", job
    found = treegen.differences(src, dst)
    if not xattrs:  # the destination cannot hold them: the job must say so instead
        found = [d for d in found if not d.startswith(("getfattr", "getfacl")) and "X" not in d.split()[1][:11]]
    assert found == [], "\n".join(found)


def _tree(cluster, part: str, name: str, owner=None) -> Path:
    top = cluster.data_dir / part / name
    treegen.make_site_tree(top, sparse_bytes=64 << 20, owner=owner)
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
