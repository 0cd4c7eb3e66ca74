"""Interrupted transfers resume; corrupted data is caught and sent again."""

import json
import shutil
import os
import signal
import time
from pathlib import Path

import pytest

from .conftest import CHUNK, assert_same_tree, finish, run_sender, send_in_process, spec_for, spoiling, start_sender, write

NCHUNKS = 96


def _wait_for_progress(proc, at_least: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        msg = json.loads(line)
        if msg.get("bytes_done", 0) >= at_least:
            return
    raise AssertionError("the sender made no progress")


def test_a_killed_sender_rerun_sends_only_unverified_chunks(roots, receiver):
    src, _ = roots
    size = NCHUNKS * CHUNK
    write(src / "big.bin", os.urandom(size))
    proc = start_sender(spec_for(receiver, src, bwlimit=16 * CHUNK, streams=2))  # ~6 s for the whole file
    _wait_for_progress(proc, 24 * CHUNK)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert not (receiver.dst / "big.bin").exists(), "an incomplete file must not be published"
    parts = [p.name for p in receiver.dst.iterdir()]
    assert any(n.endswith(".part") for n in parts) and any(n.endswith(".ok") for n in parts)

    again = run_sender(spec_for(receiver, src))
    report = again.report
    assert report["chunks_resumed"] >= 16
    assert report["bytes_sent"] == size - report["chunks_resumed"] * CHUNK
    assert report["bytes_sent"] < size
    assert_same_tree(src, receiver.dst)


def test_sigterm_stops_the_sender_promptly(roots, receiver):
    src, _ = roots
    write(src / "big.bin", os.urandom(32 * CHUNK))
    proc = start_sender(spec_for(receiver, src, bwlimit=4 * CHUNK))
    _wait_for_progress(proc, 1)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, timeout=10)
    assert time.monotonic() - t0 < 3
    assert result.returncode != 0
    assert "terminated" in result.stderr


def test_a_receiver_restarted_mid_transfer_keeps_verified_chunks(roots, receiver):
    src, dst_root = roots
    size = NCHUNKS * CHUNK
    write(src / "big.bin", os.urandom(size))
    proc = start_sender(spec_for(receiver, src, bwlimit=16 * CHUNK, streams=2))
    _wait_for_progress(proc, 24 * CHUNK)
    receiver.server.stop()  # the destination node goes away
    failed = finish(proc)
    assert failed.returncode != 0 and failed.stderr.strip()

    from cm.transfer.receiver import TransferServer

    server = TransferServer("127.0.0.1", 0, chunk_size=8 << 20)
    server.start()
    try:
        server.register(receiver.transfer_id, receiver.token, dst_root, "/out")
        report = run_sender(spec_for(receiver, src, dst_port=server.port)).report
    finally:
        server.stop()
    assert report["chunks_resumed"] >= 16
    assert report["bytes_sent"] == size - report["chunks_resumed"] * CHUNK
    assert_same_tree(src, receiver.dst)


def test_a_corrupted_chunk_is_detected_and_resent(roots, receiver):
    src, _ = roots
    size = 10 * CHUNK + 99
    write(src / "big.bin", os.urandom(size))
    report = send_in_process(spec_for(receiver, src), channel=spoiling("big.bin", 3))
    assert report["chunks_resent"] == 1
    assert report["bytes_sent"] == size + CHUNK
    assert_same_tree(src, receiver.dst)


def test_a_corrupted_small_file_is_detected_and_resent(roots, receiver):
    src, _ = roots
    for i in range(20):
        write(src / f"f{i}.txt", os.urandom(100 + i))
    report = send_in_process(spec_for(receiver, src), channel=spoiling("f7.txt"))
    assert report["chunks_resent"] == 1
    assert report["bytes_sent"] == sum(100 + i for i in range(20)) + 107
    assert_same_tree(src, receiver.dst)


@pytest.mark.timeout(90)
def test_a_stream_that_meets_a_bug_ends_the_run_with_an_error_instead_of_hanging(roots, receiver):
    import threading

    from cm.transfer import frames
    from cm.transfer.sender import TransferError
    from cm.transfer.wire import HEADER, MAGIC, VERSION, Channel

    class Broken(Channel):
        def send_stream(self, frame, data, hasher, pace=None, sent=None):
            if frame.index == 2:  # the frame's head has left, its payload never will: the receiver waits for it
                body = frames.encode(frame)
                self.io.send([HEADER.pack(MAGIC, VERSION, frames.Kind.CHUNK, len(body), len(data)) + body])
                raise RuntimeError("a bug in the middle of a frame")
            return super().send_stream(frame, data, hasher, pace, sent)

    src, _ = roots
    write(src / "big.bin", os.urandom(6 * CHUNK))
    hook, threading.excepthook = threading.excepthook, lambda args: None  # the stream thread's traceback
    try:
        started = time.monotonic()
        with pytest.raises(TransferError, match="internal error"):
            send_in_process(spec_for(receiver, src, streams=1), channel=Broken)
        assert time.monotonic() - started < 30
    finally:
        threading.excepthook = hook


@pytest.mark.parametrize("where", ["/dev/shm", None])
def test_a_received_file_is_reserved_on_disk_and_only_grown_in_memory(where, tmp_path):
    """fallocate on tmpfs zero-fills every page before it is written over (a third of the receiver's time
    on a large file); on disk it reserves the blocks so a full disk is found before the data is sent."""
    import tempfile

    from cm.transfer.destination import _reserve

    if where is not None and not os.path.isdir(where):
        pytest.skip(f"no {where} here")
    top = Path(tempfile.mkdtemp(dir=where)) if where else tmp_path
    try:
        path = top / "part"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _reserve(fd, os.fstat(fd).st_dev, 32 << 20)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        assert st.st_size == 32 << 20
        if where == "/dev/shm":
            assert st.st_blocks * 512 < 1 << 20  # sparse: nothing was zeroed ahead of the data
        else:
            assert st.st_blocks * 512 >= 32 << 20  # reserved
    finally:
        if where:
            shutil.rmtree(top)


def test_receivers_making_one_sidecar_at_once_keep_every_chunk_they_mark(tmp_path):
    # each receiver (a thread here, a rank's connection in a sync) opens the sidecar, maybe making it, then
    # marks its own chunk: none may reset it after another marked (the old code lost 30 to 60 of the 800 marks)
    import threading

    from cm.transfer.partial import ChunkRecord

    dfd = os.open(tmp_path, os.O_RDONLY)
    n, lost = 8, 0
    try:
        for run in range(100):
            name, start = f"s{run}.ok", threading.Barrier(n)

            def receiver(i, name=name, start=start):
                start.wait()
                rec = ChunkRecord.open(dfd, name, n * 4096, 1, 4096, 7, create=True)
                rec.mark(i, 100 + i)
                rec.close()

            threads = [threading.Thread(target=receiver, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rec = ChunkRecord.open(dfd, name, n * 4096, 1, 4096, 7, create=False)
            lost += n - len(rec.verified())
            rec.close()
    finally:
        os.close(dfd)
    assert lost == 0


def test_a_sparse_files_verified_chunks_are_resumed_not_sent_again(roots, receiver):
    """The destination hashes a recorded chunk again the way it travelled (its extent map, then its data)."""
    from cm.transfer.sender import TransferError
    from cm.transfer.wire import Channel

    class Cut(Channel):  # the connection is lost at chunk 8: chunks 0 to 7 are recorded at the destination
        def send_stream(self, frame, data, hasher, pace=None, sent=None):
            if frame.index >= 8:
                raise ConnectionAbortedError("cut")
            return super().send_stream(frame, data, hasher, pace, sent)

    src, _ = roots
    with open(src / "sparse.bin", "wb") as fh:  # data in the even chunks, the odd ones all hole
        fh.truncate(16 * CHUNK)
        for i in range(0, 16, 2):
            fh.seek(i * CHUNK)
            fh.write(os.urandom(CHUNK // 2))
    with pytest.raises(TransferError):
        send_in_process(spec_for(receiver, src, streams=1), channel=Cut)
    report = send_in_process(spec_for(receiver, src))
    assert report["chunks_resumed"] == 8  # chunks 0 to 7: data in the even ones, the odd ones all hole
    assert report["bytes_sent"] == 4 * (CHUNK // 2)
    assert_same_tree(src, receiver.dst)
