"""Nothing a sender says can make the receiver write outside the destination, or crash it."""

import os
import socket
import struct

import msgpack
import pytest

from cm.transfer import frames as f
from cm.transfer.paths import PathEscape
from cm.transfer.wire import HEADER, MAGIC, VERSION, Channel, Kind, RemoteError

from .conftest import assert_same_tree, run_sender, spec_for, write


def _connect(ep, token=None) -> Channel:
    from cm.transfer.connection import handshake

    chan = Channel(socket.create_connection(("127.0.0.1", ep.server.port), timeout=10))
    handshake(chan, ep.transfer_id, token or ep.token)
    return chan


def _files_under(top):
    return sorted(p.relative_to(top).as_posix() for p in top.rglob("*"))


def test_registering_a_destination_outside_the_root_is_refused(tmp_path, receiver):
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", receiver.root / "escape")
    for dst in ("../outside", "/../outside", "escape", "escape/deeper"):
        with pytest.raises(PathEscape):
            receiver.server.register("t-bad", "x", receiver.root, dst)
    assert not list((tmp_path / "outside").iterdir())


@pytest.mark.parametrize("path", [b"../escape.txt", b"/tmp/escape.txt", b"a/../../escape.txt", b"a//b", b"."])
def test_paths_that_leave_the_destination_are_refused(tmp_path, receiver, path):
    chan = _connect(receiver)
    with pytest.raises(RemoteError):
        chan.request(f.Batch([f.BatchRow(path, 3, 0o644, 0, 0)]), b"abc")
    chan.close()
    assert not (tmp_path / "escape.txt").exists() and not (receiver.root.parent / "escape.txt").exists()
    assert not receiver.dst.exists() or not _files_under(receiver.dst)


def test_a_symlinked_directory_in_the_destination_is_never_followed(tmp_path, roots, receiver):
    src, _ = roots
    outside = tmp_path / "outside"
    outside.mkdir()
    receiver.dst.mkdir()
    os.symlink(outside, receiver.dst / "sub")
    chan = _connect(receiver)
    from cm.transfer.checksum import digest

    answer = chan.request(f.Batch([f.BatchRow(b"sub/x.txt", 3, 0o644, 0, digest(b"abc"))]), b"abc")
    assert answer.errors, "writing through a symlinked directory must fail"
    with pytest.raises(RemoteError):
        chan.request(f.Chunk(b"sub/y", size=1, mode=0o644, mtime=0, chunk_size=4096, index=5))
    assert not list(outside.iterdir())
    # a real sync replaces the link with the directory the source has, still writing nothing outside
    write(src / "sub" / "x.txt", b"abc")
    run_sender(spec_for(receiver, src))
    assert not list(outside.iterdir())
    assert_same_tree(src, receiver.dst)


def test_a_source_path_leading_out_of_the_source_root_is_refused(tmp_path, roots, receiver):
    src, _ = roots
    (tmp_path / "secret").mkdir()
    write(tmp_path / "secret" / "key", b"k")
    os.symlink(tmp_path / "secret", src / "door")
    for path in ("../secret", "door"):
        result = run_sender(spec_for(receiver, src, src_path=path), expect_ok=False)
        assert result.returncode != 0 and "refused" in result.stderr
    assert not receiver.dst.exists()


def test_an_unknown_transfer_or_token_is_refused(roots, receiver):
    src, _ = roots
    write(src / "f", b"data")
    for spec in (spec_for(receiver, src, token="wrong"), spec_for(receiver, src, transfer_id="nope")):
        result = run_sender(spec, expect_ok=False)
        assert result.returncode != 0
        assert "refused" in result.stderr and "\n" not in result.stderr.strip()
    assert not receiver.dst.exists()
    receiver.server.unregister(receiver.transfer_id)
    assert run_sender(spec_for(receiver, src), expect_ok=False).returncode != 0


GARBAGE = [
    b"GET / HTTP/1.1\r\n\r\n",
    b"\x00" * 64,
    HEADER.pack(MAGIC, VERSION, 99, 0, 0),
    HEADER.pack(MAGIC, VERSION, int(Kind.HELLO), 1 << 30, 0),
    HEADER.pack(MAGIC, VERSION, int(Kind.HELLO), 3, 0) + b"\xc1\xc1\xc1",
    HEADER.pack(MAGIC, VERSION, int(Kind.HELLO), 2, 0) + b"\xd4\x01",  # msgpack ext type
    HEADER.pack(MAGIC, VERSION + 1, int(Kind.HELLO), 0, 0),
]


def test_garbage_leaves_the_server_serving(roots, receiver):
    src, _ = roots
    for garbage in GARBAGE:
        with socket.create_connection(("127.0.0.1", receiver.server.port), timeout=5) as s:
            try:
                s.sendall(garbage)
                s.shutdown(socket.SHUT_WR)
                while s.recv(4096):
                    pass
            except OSError:
                pass  # the server may reset a connection it refused
    write(src / "f", b"still works")
    run_sender(spec_for(receiver, src))
    assert (receiver.dst / "f").read_bytes() == b"still works"


def test_malformed_requests_after_hello_get_an_error_not_a_crash(roots, receiver):
    src, _ = roots
    bad_requests = [
        (Kind.BATCH, {"files": "not a list"}, b""),
        (Kind.BATCH, {"files": [[b"a", 5, 0o644, 0, 0]]}, b"abc"),  # sizes do not add up
        (Kind.CHUNK, {"path": b"x", "size": 10, "mode": 0o644, "mtime": 0, "chunk_size": 1000, "index": 0}, b""),
        (Kind.MKDIRS, {"dirs": [[b"d", 0o7777777]]}, b""),
        (Kind.DELETE, {"paths": [b"../.."]}, b""),
        (Kind.OK, {}, b""),
    ]
    for kind, meta, payload in bad_requests:
        chan = _connect(receiver)
        body = msgpack.packb(meta, use_bin_type=True)
        chan.io.send([HEADER.pack(MAGIC, VERSION, int(kind), len(body), len(payload)) + body + payload])
        with pytest.raises((RemoteError, ConnectionError)):
            chan.answer(kind)
        chan.close()
    assert receiver.root.exists() and not (receiver.root.parent / "d").exists()
    write(src / "f", b"ok")
    run_sender(spec_for(receiver, src))
    assert (receiver.dst / "f").read_bytes() == b"ok"


def test_frames_are_bounded_before_hello(receiver):
    with socket.create_connection(("127.0.0.1", receiver.server.port), timeout=5) as s:
        s.sendall(HEADER.pack(MAGIC, VERSION, int(Kind.HELLO), 5000, 0) + b"x" * 5000)
        head = s.recv(HEADER.size)
        assert struct.unpack("<2sBBIQ", head)[2] == Kind.ERROR


def test_a_batch_that_sets_owners_is_refused_unless_the_transfer_keeps_owners(receiver):
    from cm.transfer.checksum import digest

    chan = _connect(receiver)  # registered as a user's transfer: owners are not this sender's to give
    with pytest.raises(RemoteError, match="may not set owners"):
        chan.request(f.Batch([f.BatchRow(b"root-owned", 3, 0o4755, 0, digest(b"abc"), uid=0, gid=0)]), b"abc")
    chan.close()
    assert not receiver.dst.exists() or not _files_under(receiver.dst)


def test_a_file_copied_to_a_named_temporary_keeps_the_owner_it_was_given(tmp_path):
    """Where /proc cannot link an unnamed file, its data are copied into a named one: as root,
    for a sync that keeps owners, the owner given to the first (there is no owners pass for it) goes along."""
    from cm.transfer.destination import Destination

    if os.geteuid() != 0:
        pytest.skip("needs root to give files to others")
    (tmp_path / "dst").mkdir()
    dest = Destination(tmp_path / "dst", ())
    dfd = dest.dirs.open(())
    fd = os.open(tmp_path / "dst", os.O_RDWR | os.O_TMPFILE, 0o600)
    try:
        os.write(fd, b"data")
        os.fchown(fd, 4242, 4343)
        tmp = dest._named_copy(dfd, fd, 0o4750, 1_000_000_000)
    finally:
        os.close(fd)
    st = os.stat(os.fsdecode(tmp), dir_fd=dfd)
    dest.close()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777, st.st_mtime_ns) == (4242, 4343, 0o4750, 1_000_000_000)


def test_a_users_transfer_asking_for_trusted_or_security_attributes_is_refused(receiver):
    chan = _connect(receiver)  # a user's transfer: those namespaces are root's and operators' business
    for space in (b"trusted.", b"security."):
        with pytest.raises(RemoteError, match="trusted. and security. attributes are kept by root's"):
            chan.request(f.XAttrs([b"user.", space], [f.XAttrRow(b"", 0o755, [f.XAttr(space + b"x", b"1")])]))
        chan.close()
        chan = _connect(receiver)
    chan.close()
    assert not receiver.dst.exists() or not _files_under(receiver.dst)


def test_a_users_transfer_makes_no_device_and_says_why(receiver):
    chan = _connect(receiver)  # a user's transfer: a device node is skipped with the reason, a fifo is made
    got = chan.request(f.Specials([f.SpecialRow(b"null", "c", 0o666, 0, os.makedev(1, 3)),
                                   f.SpecialRow(b"pipe", "p", 0o644, 0)]))
    chan.close()
    assert [(s.path, s.message) for s in got.skipped] == [(b"null", "device files are made by root's and operators' syncs only")]
    assert not os.path.lexists(receiver.dst / "null")
    assert os.path.exists(receiver.dst / "pipe")


def test_a_small_file_rewritten_while_it_is_read_is_refused_not_copied_torn(tmp_path, monkeypatch):
    # the read itself changes the file (same size, new bytes): what was read is neither the old nor the new file
    from cm.transfer import source as source_module
    from cm.transfer.source import Source, SourceChanged
    from cm.transfer.stats import Stats
    from cm.transfer.tree import FILE, Entry

    path = tmp_path / "live.txt"
    path.write_bytes(b"a" * 4000)
    st = path.stat()
    e = Entry("live.txt", FILE, st.st_size, st.st_mtime_ns, 0o644)
    readv = os.readv

    def read_then_rewrite(fd, buffers):
        n = readv(fd, buffers)
        with open(path, "r+b") as f:  # a writer gets in between the read and the check
            f.write(b"b" * 4000)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        return n

    monkeypatch.setattr(source_module.os, "readv", read_then_rewrite)
    src = Source(tmp_path, Stats())
    handles = src.handles()
    try:
        with pytest.raises(SourceChanged, match="changed while being read"):
            src.read_one(handles, e, memoryview(bytearray(e.size)))
    finally:
        handles.close()


def test_the_oldest_unauthenticated_connections_of_an_address_are_cut_off_for_new_ones(receiver):
    from cm.transfer.receiver import AUTH_DEADLINE, MAX_UNAUTHENTICATED_PER_ADDRESS

    extra = 4
    socks = []
    try:
        for _ in range(MAX_UNAUTHENTICATED_PER_ADDRESS + extra):  # none of them says HELLO
            socks.append(socket.create_connection(("127.0.0.1", receiver.server.port), timeout=AUTH_DEADLINE * 3))
        for s in socks[:extra]:  # cut off as the newer ones came: they see the end of the stream
            assert s.recv(1) == b""
        for s in socks[extra:]:  # ...while the newer ones still have their time to authenticate
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
    finally:
        for s in socks:
            s.close()
