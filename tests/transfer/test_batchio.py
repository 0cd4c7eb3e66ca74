"""Compiled publishing of small files: each file whole, with mode and mtime, or not at all."""

from __future__ import annotations

import os
import stat

import numpy as np

from cm.transfer import batchio
from cm.transfer.checksum import digest


def _layout(files: list[tuple[bytes, bytes, int, int]], skip=(), owners=None):
    names = np.frombuffer(b"".join(name + b"\0" for name, *_ in files), dtype=np.uint8)
    name_off = np.zeros(len(files) + 1, dtype=np.int64)
    name_off[1:] = np.cumsum([len(name) + 1 for name, *_ in files])
    data = np.frombuffer(b"".join(body for _, body, *_ in files) or b"\0", dtype=np.uint8)
    data_off = np.zeros(len(files) + 1, dtype=np.int64)
    data_off[1:] = np.cumsum([len(body) for _, body, *_ in files])
    modes = np.array([mode for *_, mode, _ in files], dtype=np.uint32)
    mtimes = np.array([mtime for *_, mtime in files], dtype=np.int64)
    chmod = np.ones(len(files), dtype=np.bool_)
    skips = np.zeros(len(files), dtype=np.bool_)
    skips[list(skip)] = True
    owned = np.array(owners or [(-1, -1)] * len(files), dtype=np.int64).reshape(len(files), 2)
    return names, name_off, data, data_off, modes, chmod, owned, mtimes, skips


def test_a_run_is_published_with_content_mode_and_mtime(tmp_path):
    files = [(b"a.txt", b"alpha", 0o640, 1_600_000_000_123_456_789), (b"empty", b"", 0o600, 0),
             ("ünï ✓".encode(), os.urandom(9000), 0o4755, -1_000_000_001), (b"skipped", b"x", 0o644, 0)]
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        done = batchio.publish_run(dfd, *_layout(files, skip=[3]), 0, len(files), batchio.scratch())
    finally:
        os.close(dfd)
    assert done == len(files)
    assert sorted(os.listdir(tmp_path)) == sorted(os.fsdecode(name) for name, *_ in files[:3])
    for name, body, mode, mtime in files[:3]:
        st = os.lstat(tmp_path / os.fsdecode(name))
        assert (tmp_path / os.fsdecode(name)).read_bytes() == body
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (mode, mtime)


def test_a_run_that_keeps_owners_creates_each_file_with_its_owner_and_keeps_set_id_bits(tmp_path):
    files = [(b"theirs", b"data", 0o6755, 1_000), (b"mine", b"more", 0o644, 2_000)]
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:  # as root: a change of owner clears set-ID bits, so the mode is set after it
        done = batchio.publish_run(dfd, *_layout(files, owners=[(4242, 4343), (-1, -1)]), 0, 2, batchio.scratch())
    finally:
        os.close(dfd)
    assert done == 2
    theirs, mine = os.lstat(tmp_path / "theirs"), os.lstat(tmp_path / "mine")
    assert (theirs.st_uid, theirs.st_gid, stat.S_IMODE(theirs.st_mode)) == (4242, 4343, 0o6755)
    assert (mine.st_uid, mine.st_gid) == (os.geteuid(), os.getegid())  # -1: left as created


def test_it_stops_at_a_file_it_cannot_finish_and_leaves_nothing_of_it(tmp_path):
    (tmp_path / "taken").write_bytes(b"already here")
    files = [(b"first", b"1", 0o644, 0), (b"taken", b"new", 0o644, 0), (b"third", b"3", 0o644, 0)]
    layout = _layout(files)
    work = batchio.scratch()
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert batchio.publish_run(dfd, *layout, 0, 3, work) == 1
        assert sorted(os.listdir(tmp_path)) == ["first", "taken"]
        assert (tmp_path / "taken").read_bytes() == b"already here"
        assert batchio.publish_run(dfd, *layout, 2, 3, work) == 3
        assert batchio.publish_run(-1, *layout, 0, 3, work) == 0  # no such directory: nothing done
    finally:
        os.close(dfd)
    assert sorted(os.listdir(tmp_path)) == ["first", "taken", "third"]


class _Recorder:
    """Stands in for a connection: keeps what a batch request carried and answers that all is well."""

    def __init__(self):
        self.sent = []

    def request(self, frame, payload):
        from cm.transfer import frames

        self.sent.append((frame.files, bytes(payload)))
        return frames.BatchDone()


def test_files_that_cannot_be_read_are_left_out_of_the_batch_and_changed_ones_are_read_again(tmp_path):
    from cm.transfer import plan
    from cm.transfer.paths import DirHandles
    from cm.transfer.decide import Work
    from cm.transfer.source import Source
    from cm.transfer.spec import Spec
    from cm.transfer.stats import Stats
    from cm.transfer.streams import Streams, WorkQueue
    from cm.transfer.tree import walk

    bodies = {f"d{i % 2}/f{i}": os.urandom(100 + i) for i in range(8)}
    for path, body in bodies.items():
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_bytes(body)
    items = plan.make_items(walk(tmp_path), 1 << 20)
    (tmp_path / "d0/f2").write_bytes(b"changed after the walk")  # another size
    (tmp_path / "d1/f5").unlink()
    os.symlink("f1", tmp_path / "d1/f5")  # a link now: never followed
    os.utime(tmp_path / "d1/f7", ns=(1, 1))  # same size, another mtime
    spec = Spec.from_dict({"transfer_id": "t", "token": "k", "src_root": str(tmp_path), "src_path": "/",
                           "dst_host": "127.0.0.1", "dst_port": 1})
    stats, work = Stats(), Work()
    streams = Streams(spec, Source(tmp_path, stats), stats, work, WorkQueue(work))
    chan, handles = _Recorder(), DirHandles(tmp_path)
    try:
        streams._send_batch(chan, handles, items, memoryview(bytearray(plan.BATCH_BYTES)))
    finally:
        handles.close()
    (rows, payload), (again, payload2) = chan.sent
    kept = [os.fsdecode(row.path) for row in rows]
    assert sorted(kept) == sorted(set(bodies) - {"d0/f2", "d1/f5", "d1/f7"})
    assert payload == b"".join(bodies[path] for path in kept)
    assert [row.digest for row in rows] == [digest(bodies[path]) for path in kept]
    # the files that changed since the walk are read again as they are now, in a batch of their own
    assert [os.fsdecode(row.path) for row in again] == ["d0/f2", "d1/f7"]
    assert payload2 == b"changed after the walk" + bodies["d1/f7"] and again[1].mtime == 1
    assert [e.split(":")[0] for e in stats.errors] == ["d1/f5"] and stats.vanished == 1  # a link now
