"""What a sync keeps besides data and modes: holes of sparse files, hard links, xattrs, ACLs, special files."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest
import treegen

from cm.transfer import plan
from cm.transfer.receiver import TransferServer
from cm.transfer.tree import walk

from .conftest import Endpoint, finish, run_sender, spec_for, start_sender

SPARSE = 8 << 30  # logical bytes of the sparse file: 1 MiB of data in them


def test_a_sparse_file_sends_only_its_data_and_keeps_its_holes(roots, receiver):
    src, _ = roots
    treegen.make_sparse(src / "sparse.bin", SPARSE)
    started = time.monotonic()
    result = run_sender(spec_for(receiver, src, chunk_size=8 << 20))
    took = time.monotonic() - started
    out = receiver.dst / "sparse.bin"
    assert out.stat().st_size == SPARSE
    assert result.report["bytes_sent"] == treegen.SPARSE_DATA, result.report
    assert treegen.blocks(out) <= 2 * treegen.SPARSE_DATA, "the holes were filled"
    with open(src / "sparse.bin", "rb") as a, open(out, "rb") as b:
        for off in (0, (SPARSE // 2) & ~0xFFFF, SPARSE - treegen.SPARSE_DATA // 2):
            a.seek(off)
            b.seek(off)
            assert a.read(1 << 20) == b.read(1 << 20)
    print(f"8 GiB sparse file with 1 MiB of data: {took:.2f} s for the sender process")
    again = run_sender(spec_for(receiver, src, chunk_size=8 << 20))
    assert again.report["bytes_sent"] == 0


def test_a_sparse_file_of_one_chunk_keeps_its_holes_and_resumes_by_its_digests(roots, receiver):
    src, _ = roots
    treegen.make_sparse(src / "one.bin", 6 << 20, data=64 << 10)
    run_sender(spec_for(receiver, src, chunk_size=8 << 20))
    out = receiver.dst / "one.bin"
    assert out.read_bytes() == (src / "one.bin").read_bytes()
    assert treegen.blocks(out) <= 1 << 20
    digests = run_sender(spec_for(receiver, src, chunk_size=8 << 20, checksum=True))
    assert digests.report["bytes_sent"] == 0



def test_a_sparse_chunk_cut_short_while_it_is_hashed_is_an_error_not_a_sigbus(tmp_path, monkeypatch):
    """Resume hashes sparse chunks on both ends (the sender's source, the mover's .part, which the job's
    user may truncate): a mapping of a file cut short meanwhile would kill the process with SIGBUS."""
    from cm.transfer import sparse

    path = tmp_path / "s.bin"
    with open(path, "wb") as fh:  # 4 MiB of data, then a hole
        fh.write(os.urandom(4 << 20))
        fh.truncate(8 << 20)
    made = sparse.hasher

    class Cutting:  # the file is cut short as its first data is hashed
        def __init__(self, pairs):
            self.h, self.calls = made(pairs), 0

        def update(self, piece):
            self.calls += 1
            if self.calls == 1:
                os.truncate(path, 4096)
            self.h.update(piece)

        def digest(self):
            return self.h.digest()

    monkeypatch.setattr(sparse, "hasher", Cutting)
    fd = os.open(path, os.O_RDONLY)
    pid = os.fork()
    if pid == 0:
        try:
            sparse.chunk_digest(fd, 0, 8 << 20)
        except OSError:
            os._exit(3)
        except BaseException:
            os._exit(4)
        os._exit(0)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3, f"wait status {status:#x}"


def test_a_hard_link_whose_file_could_not_be_copied_is_not_linked_to_what_was_there(roots, receiver):
    """Its first name failed (a full disk, a checksum that kept failing): the destination still has that
    name's old data, and the other name must not be made a link to it."""
    from cm.transfer import frames
    from cm.transfer.sender import Sender
    from cm.transfer.spec import Spec
    from cm.transfer.wire import Channel

    from .conftest import write

    class Spoiling(Channel):  # a.txt's bytes are spoiled on the wire every time: it cannot be copied
        def send(self, frame, payload=None, kind=None):
            if isinstance(frame, frames.Batch) and payload is not None:
                pos = 0
                for row in frame.files:
                    if row.path == b"a.txt":
                        payload[pos] ^= 0xFF
                    pos += row.size
            return super().send(frame, payload, kind)

    src, _ = roots
    write(src / "a.txt", b"old\n", mtime=1_000_000)
    run_sender(spec_for(receiver, src))
    write(src / "a.txt", b"new\n", mtime=2_000_000)
    os.link(src / "a.txt", src / "b.txt")
    sender = Sender(Spec.from_dict(spec_for(receiver, src)), lambda progress: None, channel=Spoiling)
    report = sender.run()
    assert (receiver.dst / "a.txt").read_bytes() == b"old\n"
    assert not (receiver.dst / "b.txt").exists(), "linked to the old data"
    assert report["errors"] == 2, sender.stats.errors


def test_a_directory_the_walk_cannot_enter_is_named_not_passed_over_in_silence(nobody):
    """The sender reports each of these as a failure of its sync (what is in it was not copied)."""
    tmp_path = Path(tempfile.mkdtemp(prefix="cm-walk-"))  # pytest's own is root's alone
    top = tmp_path / "tree"
    (top / "shut").mkdir(parents=True)
    (top / "shut" / "hidden.txt").write_bytes(b"h")
    (top / "open").mkdir()
    (top / "shut").chmod(0o700)  # root's, and the walk below is nobody's
    for p in (tmp_path, top, top / "open"):
        p.chmod(0o755)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child that has become nobody walks
        os.close(r)
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        try:
            unreadable: list = []
            paths = [e.path for e in walk(top, unreadable=unreadable)]
            os.write(w, json.dumps([paths, unreadable]).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        paths, unreadable = json.loads(f.read())
    os.waitpid(pid, 0)
    shutil.rmtree(tmp_path)
    assert "shut" in paths and "shut/hidden.txt" not in paths
    assert unreadable == [["shut", "Permission denied"]]


@pytest.mark.parametrize("policy", plan.POLICIES)
def test_two_ranks_share_a_sparse_files_chunks_and_its_runs_of_holes(roots, policy):
    src, dst_root = roots
    treegen.make_sparse(src / "sparse.bin", 1 << 30, data=3 << 20)  # 128 chunks of 8 MiB, 3 with data
    servers = [TransferServer("127.0.0.1", 0, chunk_size=8 << 20) for _ in range(2)]
    try:
        endpoints = []
        for server in servers:
            server.start()
            server.register("job-8", "tok", dst_root, "/out")
            endpoints.append(Endpoint(server, "job-8", "tok", dst_root, "/out"))
        procs = [start_sender(spec_for(ep, src, rank=r, nranks=2, policy=policy, chunk_size=8 << 20))
                 for r, ep in enumerate(endpoints)]
        results = [finish(p) for p in procs]
    finally:
        for server in servers:
            server.stop()
    for r in results:
        assert r.returncode == 0, r.stderr
    out = dst_root / "out" / "sparse.bin"
    assert sum(r.report["bytes_sent"] for r in results) == 3 << 20
    assert treegen.blocks(out) <= 4 << 20
    assert filecmp.cmp(src / "sparse.bin", out, shallow=False)


def test_a_rank_starting_after_another_keeps_the_sparse_chunks_it_recorded(roots, receiver):
    # the second rank's resume check hashes the first rank's chunks again at the destination: the way they
    # were received (map and data), else it clears them all and nobody sends them again
    src, _ = roots
    treegen.make_sparse(src / "sparse.bin", 1 << 30, data=3 << 20)
    results = [run_sender(spec_for(receiver, src, rank=r, nranks=2, chunk_size=8 << 20)) for r in range(2)]
    assert sum(r.report["bytes_sent"] for r in results) == 3 << 20
    assert results[1].report["chunks_resumed"] == 0  # a rank resumes only its own share
    out = receiver.dst / "sparse.bin"
    assert filecmp.cmp(src / "sparse.bin", out, shallow=False)
    assert treegen.blocks(out) <= 4 << 20
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".cm.")]


def test_a_rerun_after_a_killed_sender_reports_the_chunks_verified_before(roots, receiver, tmp_path):
    import signal

    from cm.transfer.report import Report
    from cm.transfer.sender import Sender
    from cm.transfer.spec import Spec

    from .conftest import CHUNK, write
    from .test_transfer_resume import _wait_for_progress

    src, _ = roots
    write(src / "big.bin", os.urandom(64 * CHUNK))
    proc = start_sender(spec_for(receiver, src, bwlimit=16 * CHUNK, streams=2))
    _wait_for_progress(proc, 24 * CHUNK)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    path = tmp_path / "files-0.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    report = Sender(Spec.from_dict(spec_for(receiver, src)), lambda line: None, report=Report(fd)).run()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    (big,) = [line for line in lines if line["path"] == "big.bin"]
    assert big["action"] == "created" and big["chunks_resumed"] == report["chunks_resumed"] >= 16
    assert len(big["chunks_xxh3"]) == 64 - big["chunks_resumed"]


def test_a_single_file_source_keeps_its_xattrs(roots, receiver):
    src, _ = roots
    (src / "one.txt").write_bytes(b"one")
    os.setxattr(src / "one.txt", "user.kept", b"yes")
    run_sender(spec_for(receiver, src, src_path="/one.txt"))
    assert os.getxattr(receiver.dst / "one.txt", "user.kept") == b"yes"


@pytest.fixture
def users_receiver(nobody):
    """(source root, receiver writing dst-root/out as nobody): a user's sync, where modes are enforced."""
    from cm.creds import Identity

    top = Path(tempfile.mkdtemp(prefix="cm-ro-"))  # pytest's own is root's alone
    top.chmod(0o755)
    src, dst_root = top / "src-root", top / "dst-root"
    src.mkdir()
    dst_root.mkdir()
    os.chown(dst_root, nobody.pw_uid, nobody.pw_gid)
    server = TransferServer("127.0.0.1", 0, chunk_size=8 << 20)
    server.start()
    ep = Endpoint(server, "t-ro", "tok-ro", dst_root, "/out")
    server.register(ep.transfer_id, ep.token, dst_root, ep.dst_path, Identity(nobody.pw_uid, nobody.pw_gid, ()))
    yield src, ep
    server.stop()
    shutil.rmtree(top)


def _read_only_tree(top: Path, owner, extra: str = "", hard_link: bool = True) -> None:
    """A tree with a read-only directory (0555) holding small files, a file of several chunks, a symlink,
    a hard link's second name and a subdirectory; everything ``owner``'s, directory mtimes set
    after their contents."""
    from .conftest import CHUNK, write

    ro = top / "ro"
    if ro.exists():
        ro.chmod(0o755)
    for i in range(8):
        write(ro / f"f{i}{extra}.txt", f"{i}{extra}\n".encode(), mode=0o444)
    write(ro / f"big{extra}.bin", os.urandom(CHUNK * 3 + 5), mode=0o444)
    write(ro / f"sub{extra}" / "leaf.txt", b"leaf\n")
    os.symlink(f"f0{extra}.txt", ro / f"link{extra}")
    write(top / "plain" / f"p{extra}.txt", b"p\n")
    if hard_link:  # its other name is linked in ro/ (by every run: hard links are always looked at)
        os.link(top / "plain" / f"p{extra}.txt", ro / f"hard{extra}.txt")
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), owner.pw_uid, owner.pw_gid, follow_symlinks=False)
        os.utime(dirpath, ns=(1_500_000_000 * 10**9,) * 2)
    os.chown(top, owner.pw_uid, owner.pw_gid)
    ro.chmod(0o555)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_a_users_two_ranks_fill_a_read_only_directory_whichever_ends_first(users_receiver, nobody, order):
    """The rank that ends first gives ro/ its mode (0555) while the other still has files to write there
    (here: the other rank starts only then): that rank's files go in, and ro/ ends 0555 with its mtime."""
    from .conftest import assert_same_tree

    src, ep = users_receiver
    _read_only_tree(src, nobody)
    results = [run_sender(spec_for(ep, src, rank=r, nranks=2), expect_ok=False) for r in order]
    for r in results:
        assert r.returncode == 0 and r.report["errors"] == 0, r.stderr
    assert_same_tree(src, ep.dst)
    assert stat.S_IMODE(os.stat(ep.dst / "ro").st_mode) == 0o555


def test_a_users_sync_again_writes_into_the_read_only_directory_an_earlier_run_made(users_receiver, nobody):
    from .conftest import assert_same_tree

    src, ep = users_receiver
    _read_only_tree(src, nobody)
    run_sender(spec_for(ep, src))
    _read_only_tree(src, nobody, extra="-new")  # new files, a new subdirectory and link in ro/
    again = run_sender(spec_for(ep, src), expect_ok=False)
    assert again.returncode == 0 and again.report["errors"] == 0, again.stderr
    assert_same_tree(src, ep.dst)


def test_a_read_only_directory_above_the_destination_is_left_as_it_is(users_receiver, nobody):
    """Only the tree's own directories are opened up (each rank gives them their mode back): one above the
    destination, which the sync must make its top in, keeps its mode and the sync fails."""
    from cm.creds import Identity

    src, ep = users_receiver
    _read_only_tree(src, nobody)
    shut = ep.root / "shut"
    shut.mkdir(mode=0o555)
    os.chown(shut, nobody.pw_uid, nobody.pw_gid)
    ep.server.register("t-shut", "tok-shut", ep.root, "/shut/out", Identity(nobody.pw_uid, nobody.pw_gid, ()))
    result = run_sender({**spec_for(ep, src), "transfer_id": "t-shut", "token": "tok-shut"}, expect_ok=False)
    assert result.returncode != 0 and "Permission denied" in result.stderr, result.stderr
    assert stat.S_IMODE(shut.stat().st_mode) == 0o555 and not (shut / "out").exists()


def test_a_partial_file_no_run_resumes_is_removed_from_a_read_only_directory_which_keeps_its_mode(
        users_receiver, nobody):
    """The lead removes it (opening ro/ up for that) and gives ro/ its mode and mtime back, though it
    writes nothing else there."""
    from .conftest import assert_same_tree

    src, ep = users_receiver
    _read_only_tree(src, nobody, hard_link=False)  # nothing else of this run's in ro/
    run_sender(spec_for(ep, src))
    ro = ep.dst / "ro"
    ro.chmod(0o755)
    stale = ro / f".cm.{'0' * 20}.part"  # another version's: no run resumes it
    stale.write_bytes(b"old")
    os.chown(stale, nobody.pw_uid, nobody.pw_gid)
    ro.chmod(0o555)
    os.utime(ro, ns=(os.stat(src / "ro").st_mtime_ns,) * 2)
    again = run_sender(spec_for(ep, src), expect_ok=False)
    assert again.returncode == 0 and again.report["errors"] == 0, again.stderr
    assert not stale.exists()
    assert_same_tree(src, ep.dst)
