"""The data plane's records and handshake: what is altered, replayed, reordered or keyed wrong is refused."""

from __future__ import annotations

import socket

import pytest

from cm.transfer import frames as f
from cm.transfer import secure
from cm.transfer.connection import handshake
from cm.transfer.wire import VERSION, Channel

from .conftest import spec_for, send_in_process, write


class Tap:
    """A socket stand-in that keeps the records a sealed sender writes instead of sending them."""

    def __init__(self):
        self.records: list[bytes] = []

    def sendmsg(self, views) -> int:
        self.records.append(b"".join(bytes(v) for v in views))
        return sum(len(v) for v in views)


def _pair(encrypt: bool, script: bytes = b"t"):
    session = secure.Session(secure.run_key("k"), script + (b"\1" if encrypt else b"\0"))
    tap = Tap()
    sender = session.records(tap, "sender")
    a, b = socket.socketpair()
    receiver = session.records(b, "mover")
    return sender, tap, a, receiver


@pytest.mark.parametrize("encrypt", [True, False], ids=["encrypted", "authenticated"])
@pytest.mark.parametrize("spoil", ["altered", "replayed", "reordered", "dropped", "other connection"])
def test_a_record_spoiled_on_the_wire_is_refused(encrypt, spoil):
    sender, tap, a, receiver = _pair(encrypt)
    for word in (b"first record", b"second record", b"third record"):
        sender.send([word])
    one, two, three = tap.records
    if spoil == "altered":
        wire = one + two[:-20] + bytes([two[-20] ^ 1]) + two[-19:]
    elif spoil == "replayed":
        wire = one + one
    elif spoil == "reordered":
        wire = two + one
    elif spoil == "dropped":
        wire = one + three
    else:
        other, other_tap, _, _ = _pair(encrypt, b"another transcript")
        other.send([b"first record"])
        wire = other_tap.records[0]
    a.sendall(wire)
    a.close()
    got = bytearray(len(b"first record"))
    with pytest.raises(secure.AuthError):
        receiver.recv_into(memoryview(got))
        receiver.recv_into(memoryview(bytearray(len(b"second record"))))
    receiver.sock.close()


@pytest.mark.parametrize("encrypt", [True, False], ids=["encrypted", "authenticated"])
def test_records_carry_large_and_split_reads_unchanged(encrypt):
    sender, tap, a, receiver = _pair(encrypt)
    big = bytes(range(256)) * (5 << 12)  # over one record
    sender.send([b"head", big])
    assert (big[:100] in b"".join(tap.records)) != encrypt
    import threading

    writer = threading.Thread(target=a.sendall, args=(b"".join(tap.records),))
    writer.start()
    out = bytearray(4 + len(big))
    view = memoryview(out)
    receiver.recv_into(view[:2])
    receiver.recv_into(view[2:10])
    receiver.recv_into(view[10:])
    assert bytes(out) == b"head" + big
    writer.join()
    a.close()
    receiver.sock.close()


def test_a_sender_without_the_runs_key_gets_no_welcome_and_the_mover_no_request(roots, receiver):
    with socket.create_connection(("127.0.0.1", receiver.server.port), timeout=10) as s:
        chan = Channel(s)
        with pytest.raises(secure.AuthError, match="mover failed to prove"):
            handshake(chan, receiver.transfer_id, "not the key")
    with socket.create_connection(("127.0.0.1", receiver.server.port), timeout=10) as s:
        chan = Channel(s)  # a sender that has a mover's proof but makes its own up
        challenge = chan.request(f.Hello(receiver.transfer_id, secure.new_nonce()))
        chan.send(f.Auth(b"\0" * 32))
        session = secure.Session(b"\0" * 32, secure.transcript(VERSION, receiver.transfer_id, b"", challenge.nonce,
                                                             challenge.encrypt))
        chan.secure(session.records(s, "sender"))
        with pytest.raises(ConnectionError):
            chan.answer(f.Kind.AUTH)  # sealed under keys it does not have: unreadable
    assert not receiver.dst.exists()


def test_a_sync_goes_through_with_encryption_off(roots):
    from cm.transfer.receiver import TransferServer

    src, dst = roots
    server = TransferServer("127.0.0.1", 0, chunk_size=8 << 20, encrypt=False)
    server.start()
    try:
        from .conftest import Endpoint

        ep = Endpoint(server, "t-plain", "k" * 32, dst, "/out")
        server.register(ep.transfer_id, ep.token, ep.root, ep.dst_path)
        write(src / "big.bin", bytes(range(256)) * 4096 * 3)
        write(src / "small.txt", b"small")
        send_in_process(spec_for(ep, src))
        assert (ep.dst / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
        assert (ep.dst / "small.txt").read_bytes() == b"small"
    finally:
        server.stop()
