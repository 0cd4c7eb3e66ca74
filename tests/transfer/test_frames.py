"""Every frame of the mover has one schema: what fits goes through unchanged, what does not is refused
at decode with the field named — in memory, and over a real socket to a real receiver."""

import socket

import msgpack
import pytest

from cm.transfer import control
from cm.transfer import frames as f
from cm.transfer.frames import Kind
from cm.transfer.wire import HEADER, MAGIC, VERSION, Channel, ProtocolError, RemoteError

P = b"d\xff/file name"  # paths are raw bytes, not necessarily UTF-8

# one well-formed example of each request, as a peer would put it on the wire (plain msgpack)
GOOD = {
    Kind.HELLO: {"transfer_id": "t-1", "nonce": b"n" * 32},
    Kind.AUTH: {"proof": b"p" * 32},
    Kind.MANIFEST: {"page": 2},
    Kind.PARTIALS: {"files": [[P, 10, -5, 4096]]},
    Kind.CHECKSUMS: {"files": [[P, 10, 4096]]},
    Kind.MKDIRS: {"dirs": [[P, 0o755]]},
    Kind.DELETE: {"paths": [P, b"x"]},
    Kind.SYMLINKS: {"links": [[P, b"../t", 1 << 62]]},
    Kind.META: {"files": [[P, 0o4755, 0]]},
    Kind.BATCH: {"files": [[P, 3, 0o644, 7, (1 << 64) - 1, 1000, 1000]]},
    Kind.CHUNK: {"path": P, "size": 10, "mode": 0o600, "mtime": 1, "chunk_size": 4096, "index": 0,
                 "extents": [[0, 3], [8, 2]]},
    Kind.DIRMETA: {"dirs": [[P, 0o700, 2]]},
    Kind.OWNERS: {"entries": [[P, 1000, 100, 0o2775]]},
    Kind.SPECIALS: {"entries": [[P, "p", 0o644, 5, 0], [b"dev", "c", 0o600, 5, 259]]},
    Kind.HARDLINKS: {"links": [[P, b"first/name"]]},
    Kind.XATTRS: {"namespaces": [b"user.", b"system.posix_acl_access"], "entries": [[P, 0o640, [[b"user.a", b"\0"]]]]},
    Kind.BYE: {},
}

# per kind: (a change that breaks it, the field the refusal must name)
BAD = {
    Kind.HELLO: ({"nonce": b"short"}, "`nonce`"),
    Kind.AUTH: ({"proof": "text"}, "`proof`"),
    Kind.MANIFEST: ({"page": -1}, "`page`"),
    Kind.PARTIALS: ({"files": [[P, 10, 1 << 63, 4096]]}, "`files[0].mtime`"),
    Kind.CHECKSUMS: ({"files": [[P, 10, 1000]]}, "`files[0].chunk_size`"),
    Kind.MKDIRS: ({"dirs": [[P, 0o7777777]]}, "`dirs[0].mode`"),
    Kind.DELETE: ({"paths": [P, "text"]}, "`paths[1]`"),
    Kind.SYMLINKS: ({"links": [[P, "text", 0]]}, "`links[0].target`"),
    Kind.META: ({"files": [[P, 0o644, True]]}, "`files[0].mtime`"),
    Kind.BATCH: ({"files": [[P, 3, 0o644, 7]]}, "`files[0]`"),
    Kind.CHUNK: ({"index": None}, "`index`"),
    Kind.DIRMETA: ({"dirs": [["text", 0o700, 2]]}, "`dirs[0].path`"),
    Kind.OWNERS: ({"entries": [[P, -1, 0, 0]]}, "`entries[0].uid`"),
    Kind.SPECIALS: ({"entries": [[P, "f", 0o644, 5, 0]]}, "`entries[0].kind`"),
    Kind.HARDLINKS: ({"links": [[P]]}, "`links[0]`"),
    Kind.XATTRS: ({"entries": [[P, 0o640, [[b"user.a"]]]]}, "`entries[0].attrs[0]`"),
    Kind.BYE: ({"surprise": 1}, "`surprise`"),
}


def test_every_request_kind_has_a_schema_and_every_answered_one_an_answer():
    assert set(f.REQUESTS) == set(Kind) - {Kind.OK, Kind.ERROR}
    assert set(f.ANSWERS) == set(f.REQUESTS) - {Kind.BYE}
    assert set(GOOD) == set(BAD) == set(f.REQUESTS)


@pytest.mark.parametrize("kind", list(f.REQUESTS), ids=lambda k: k.name)
def test_a_well_formed_request_decodes_and_encodes_back_to_the_same_bytes(kind):
    raw = msgpack.packb(GOOD[kind], use_bin_type=True)
    frame = f.decode_request(kind, raw)
    assert isinstance(frame, f.REQUESTS[kind])
    assert msgpack.unpackb(f.encode(frame), raw=False) == GOOD[kind]


@pytest.mark.parametrize("kind", list(f.REQUESTS), ids=lambda k: k.name)
def test_a_malformed_request_is_refused_with_its_field_named(kind):
    change, field = BAD[kind]
    raw = msgpack.packb({**GOOD[kind], **change}, use_bin_type=True)
    with pytest.raises(f.FrameError) as refused:
        f.decode_request(kind, raw)
    assert field in str(refused.value) and kind.name in str(refused.value)


@pytest.mark.parametrize("raw", [b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa4path\xd4\x01\x00", b""])
def test_bytes_that_are_no_map_of_fields_are_refused(raw):
    with pytest.raises(f.FrameError):
        f.decode_request(Kind.CHUNK, raw)


def test_a_chunk_size_above_the_receivers_maximum_is_refused_by_the_receiver(receiver):
    chan = _connect(receiver)  # this receiver takes chunks up to 8 MiB
    try:
        with pytest.raises(RemoteError, match="above this receiver's"):
            chan.request(f.Checksums([f.ChecksumRow(P, 10, 16 << 20)]))
    finally:
        chan.close()


def test_a_missing_field_is_named():
    with pytest.raises(f.FrameError, match="`size`"):
        f.decode_request(Kind.CHUNK, msgpack.packb({"path": P}))


def test_a_chunk_carries_owners_only_when_it_has_them():
    plain = f.Chunk(P, 10, 0o644, 1, 4096, 0)
    assert "uid" not in msgpack.unpackb(f.encode(plain), raw=False)
    owned = f.decode_request(Kind.CHUNK, f.encode(f.Chunk(P, 10, 0o644, 1, 4096, 0, uid=5, gid=6)))
    assert (owned.uid, owned.gid) == (5, 6)


ANSWERS = {
    Kind.HELLO: f.Challenge(b"n" * 32, b"p" * 32, False),
    Kind.AUTH: f.Welcome(64 << 20, 16 << 20),
    Kind.MANIFEST: f.ManifestPage([f.EntryRow(P, "f", 3, -1, 0o644, b"", 1000, 100), f.EntryRow(b"l", "l", 0, 0, 0o777, P, -1, -1)], True),
    Kind.PARTIALS: f.Verified([[f.VerifiedRow(0, 1 << 63)], []]),
    Kind.CHECKSUMS: f.Digests([[1, 2], None]),
    Kind.MKDIRS: f.Done([f.PathError(P, "PermissionError: no")]),
    Kind.DELETE: f.Removed(3, []),
    Kind.SYMLINKS: f.Done(),
    Kind.META: f.Done(),
    Kind.BATCH: f.BatchDone([1], [f.PathError(P, "x")]),
    Kind.CHUNK: f.ChunkDone(False, False, "Permission denied"),
    Kind.DIRMETA: f.Done(),
    Kind.OWNERS: f.Done(),
    Kind.SPECIALS: f.Applied([0], [], [f.PathError(P, "device files are made by root's and operators' syncs only")]),
    Kind.HARDLINKS: f.Applied([1, 2]),
    Kind.XATTRS: f.Applied(skipped=[f.PathError(P, "ACL system.posix_acl_access: the destination cannot hold it")]),
}


@pytest.mark.parametrize("kind", list(f.ANSWERS), ids=lambda k: k.name)
def test_every_answer_round_trips(kind):
    answer = ANSWERS[kind]
    assert f.decode_answer(kind, True, f.encode(answer)) == answer


def test_a_malformed_answer_is_refused_with_its_field_named():
    raw = msgpack.packb({"entries": [[P, "x", 1, 1, 1, b"", 0, 0]], "more": False}, use_bin_type=True)
    assert f.decode_answer(Kind.MANIFEST, True, msgpack.packb({"entries": [[P, "p", 0, 1, 0o644, b"", 0, 0]]}))
    with pytest.raises(f.FrameError, match=r"`entries\[0\].kind`"):
        f.decode_answer(Kind.MANIFEST, True, raw)
    assert f.decode_answer(Kind.BATCH, False, msgpack.packb({"message": "no"})).message == "no"
    with pytest.raises(f.FrameError, match="BYE is not answered"):
        f.decode_answer(Kind.BYE, True, msgpack.packb({}))


def _connect(receiver) -> Channel:
    from cm.transfer.connection import handshake

    chan = Channel(socket.create_connection(("127.0.0.1", receiver.server.port), timeout=10))
    handshake(chan, receiver.transfer_id, receiver.token)
    return chan


@pytest.mark.parametrize("kind", [Kind.BATCH, Kind.MKDIRS, Kind.OWNERS, Kind.CHUNK], ids=lambda k: k.name)
def test_the_receiver_answers_a_malformed_frame_with_an_error_naming_the_field_and_hangs_up(receiver, kind):
    change, field = BAD[kind]
    body = msgpack.packb({**GOOD[kind], **change}, use_bin_type=True)
    chan = _connect(receiver)
    try:
        chan.io.send([HEADER.pack(MAGIC, VERSION, kind, len(body), 0) + body])
        with pytest.raises(RemoteError) as refused:
            chan.answer(kind)
        assert field in str(refused.value)
        assert chan.sock.recv(1) == b""  # the stream may be out of step: the receiver hangs up
    finally:
        chan.close()
    assert not receiver.dst.exists()


def test_the_receiver_answers_a_well_formed_request_with_its_answer_struct(receiver):
    chan = _connect(receiver)
    try:
        done = chan.request(f.Mkdirs([f.DirRow(b"", 0o755), f.DirRow(b"a", 0o700)]))
        assert done == f.Done([])
        page = chan.request(f.Manifest(0))
        assert [(e.path, e.kind) for e in page.entries] == [(b"", "d"), (b"a", "d")]
    finally:
        chan.close()


def test_a_sender_refuses_an_answer_that_does_not_fit():
    a, b = socket.socketpair()
    try:
        body = msgpack.packb({"max_chunk": "big"})
        b.sendall(HEADER.pack(MAGIC, VERSION, Kind.OK, len(body), 0) + body)
        with pytest.raises(ProtocolError, match="`max_chunk`"):
            Channel(a).answer(Kind.AUTH)
    finally:
        a.close()
        b.close()


# ---- the mover's control channel ----

def test_control_requests_round_trip():
    reg = control.Register("t", "k", "/data", "/x", 1000, 100, [100, 10], True)
    for req in (reg, control.Unregister("t"), control.Ping()):
        assert control.decode_control(control.encode_request(req)) == req
    answer = control.Answer(True, ready=True, pid=7)
    assert control.decode_answer(control.encode_answer(answer)) == answer


@pytest.mark.parametrize("line, field", [
    (b'{"op": "register", "transfer_id": "t", "token": "k", "root": "/", "dst_path": "/", "uid": true, "gid": 0}',
     "`uid`"),
    (b'{"op": "register", "transfer_id": "", "token": "k", "root": "/", "dst_path": "/", "uid": 0, "gid": 0}',
     "`transfer_id`"),
    (b'{"op": "unregister"}', "`transfer_id`"),
    (b'{"op": "reboot"}', "`op`"),
    (b'{"op": "ping", "extra": 1}', "`extra`"),
])
def test_a_malformed_control_request_is_refused_with_its_field_named(line, field):
    with pytest.raises(ValueError) as refused:
        control.decode_control(line)
    assert field in str(refused.value)


def test_the_mover_process_refuses_a_bad_control_line_and_keeps_serving(tmp_path):
    from cm.node.mover import Mover, MoverError

    mover = Mover("127.0.0.1", 0, chunk_size=1 << 20)
    mover.start()
    try:
        with mover._lock:
            answer = mover._ask(control.Ping())
            assert answer.ok
            mover.proc.stdin.write(b'{"op": "register", "transfer_id": "t"}\n')
            mover.proc.stdin.flush()
            refused = mover._read_answer()
        assert not refused.ok and "token" in refused.error
        (tmp_path / "d").mkdir()
        with pytest.raises(MoverError, match="refused"):
            mover.register("t", "k", tmp_path / "d", "../..", _me())
        mover.register("t", "k", tmp_path / "d", "/x", _me())
        assert mover.proc.poll() is None and mover.starts == 1
    finally:
        mover.stop()


def _me():
    import os

    from cm.creds import Identity

    return Identity(os.geteuid(), os.getegid(), tuple(os.getgroups()))
