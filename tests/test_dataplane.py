"""The data plane against a hostile user on the same host: real cluster, real users, real sockets.

What a capture of alice's sync holds, what replaying or altering it does,
and whether bob can hold her syncs up with an exclude pattern that
backtracks or with connections that never finish saying hello. A relay
between the senders and the destination's mover (the mover listens on
127.0.0.1, nodes are told 127.0.0.2) is the wire an attacker sees.
"""

from __future__ import annotations

import os
import random
import re
import select
import socket
import threading
import time

import pytest

import test_multiuser
from test_multiuser import FINAL, in_child_as, owned_dir, submit_as

users = test_multiuser.users  # the module's real Unix users (a fixture)

DST = "computenode-3"  # in partition cpu; sources are in gpu


def free_port_in_range() -> int:
    """A free port of this suite's range (the destination mover's, fixed so the relay knows it)."""
    for _ in range(50):
        port = random.randint(24100, 24999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.2", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


class Relay:
    """127.0.0.2:port → 127.0.0.1:port, both ways, keeping every byte; may change what senders say.

    ``replace``: (old, new) of one length, done once in what a sender sends.
    ``hold_after``: once the sender has sent these bytes and the mover has
    answered, stop forwarding until ``release()`` (the run stays open).
    """

    def __init__(self, port: int, replace: tuple[bytes, bytes] | None = None, hold_after: bytes | None = None):
        self.port = port
        self.replace, self.replaced = replace, 0
        self.hold_after = hold_after
        self.held = threading.Event()
        self._open = threading.Event()
        self._open.set()
        self.sent: list[bytearray] = []  # what each connection's sender sent, as the mover got it
        self.answered = bytearray()  # what the mover sent back, all connections
        self._stop = threading.Event()
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.2", port))
        self.lsock.listen(64)
        self.lsock.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._stop.set()
        self._open.set()
        self.lsock.close()

    def wire(self) -> bytes:
        return b"".join(self.sent) + bytes(self.answered)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.lsock.accept()
            except OSError:
                continue
            server = socket.create_connection(("127.0.0.1", self.port))
            log = bytearray()
            self.sent.append(log)
            state = {"seen": False}
            threading.Thread(target=self._pump, args=(client, server, log, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.answered, state, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, log: bytearray, state: dict, from_sender: bool) -> None:
        keep = len(self.replace[0]) - 1 if (from_sender and self.replace) else 0
        pending = bytearray()
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([src], [], [], 0.05)
                data = src.recv(1 << 16) if ready else b""
                if ready and not data:
                    break
                pending += data
                if from_sender and self.replace and not self.replaced and self.replace[0] in pending:
                    i = pending.index(self.replace[0])
                    pending[i:i + len(self.replace[0])] = self.replace[1]
                    self.replaced += 1
                cut = len(pending) - keep if data else len(pending)  # quiet: flush what was kept back
                if cut <= 0:
                    continue
                out, pending = bytes(pending[:cut]), pending[cut:]
                self._open.wait()
                dst.sendall(out)
                log += out
                if self.hold_after and from_sender and self.hold_after in log:
                    state["seen"] = True
                if not from_sender and state["seen"] and not self.held.is_set():
                    self._open.clear()  # the mover has answered what held the marker: hold everything now
                    self.held.set()
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def relayed(make_cluster, users):
    """A cluster whose nodes are told 127.0.0.2 for movers that listen on 127.0.0.1, and a factory of relays."""
    port = free_port_in_range()
    relays: list[Relay] = []

    def make(encrypt: bool = True, **relay):
        # encryption on is the default: only turning it off is said
        cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1, transfer_host="127.0.0.2",
                               transfer_bind="127.0.0.1", **({} if encrypt else {"data_encrypt": "false"}),
                               **{f"transfer_port_{DST.replace('-', '_')}": port})
        for part in ("gpu", "cpu"):
            for name, user in users.items():
                owned_dir(cluster.data_dir / part / name, user, 0o755)
        relays.append(Relay(port, **relay))
        return cluster, relays[-1]

    yield make
    for r in relays:
        r.close()


def _source(cluster, user, name: str, files: dict[str, bytes]):
    src = owned_dir(cluster.data_dir / "gpu" / user.pw_name.removeprefix("cmt_") / name, user, 0o700)
    for rel, data in files.items():
        (src / rel).write_bytes(data)
        os.chown(src / rel, user.pw_uid, user.pw_gid)
    return src


def _sync(cluster, user, src: str, dst: str, **options) -> int:
    return submit_as(cluster, user, kind="sync", src=src, dst=dst, options=options, cwd="/")


def test_a_capture_of_alices_sync_holds_neither_her_token_nor_her_data(relayed, users):
    cluster, relay = relayed(encrypt=True)
    alice = users["alice"]
    marker = b"ALICE-PRIVATE-MARKER-" + os.urandom(8).hex().encode()
    _source(cluster, alice, "secret", {"notes.txt": marker * 50, "big.bin": marker + os.urandom(3 << 20) + marker})
    job = cluster.wait_state(_sync(cluster, alice, "gpu:/alice/secret", f"{DST}:/alice/copy"), FINAL, timeout=60)
    assert job["state"] == "COMPLETED", job
    assert (cluster.data_dir / "cpu" / "alice" / "copy" / "notes.txt").read_bytes() == marker * 50
    wire = relay.wire()
    assert len(wire) > 3 << 20, "the sync went through the relay"
    assert marker not in wire, "file contents in clear on the wire"
    assert not re.search(rb"[0-9a-f]{32}", wire), "a hex token on the wire"
    assert b"token" not in wire


def test_with_encryption_off_a_byte_altered_on_the_wire_is_refused_and_the_sync_retried(relayed, users):
    cluster, relay = relayed(encrypt=False, replace=(b"tamper-me.txt", b"tamper-XX.txt"))
    alice = users["alice"]
    marker = b"PLAIN-BUT-AUTHENTICATED"
    _source(cluster, alice, "plain", {"tamper-me.txt": marker})
    job = cluster.wait_state(_sync(cluster, alice, "gpu:/alice/plain", f"{DST}:/alice/plain"), FINAL, timeout=90)
    assert relay.replaced == 1
    assert marker in relay.wire(), "encryption off: contents travel in clear (authenticated only)"
    dst = cluster.data_dir / "cpu" / "alice" / "plain"
    assert not (dst / "tamper-XX.txt").exists(), "an altered frame was obeyed"
    assert job["state"] == "COMPLETED", job
    assert (dst / "tamper-me.txt").read_bytes() == marker
    assert "failed its check" in cluster.tail(DST, 400)


def test_a_replayed_capture_of_alices_connection_is_refused_and_writes_nothing(relayed, users):
    marker = b"REPLAY-ME-" + os.urandom(6).hex().encode()
    cluster, relay = relayed(encrypt=False, hold_after=marker)  # contents in clear: the relay sees the batch go
    alice, bob = users["alice"], users["bob"]
    _source(cluster, alice, "replay", {"replayed.txt": marker})
    job_id = _sync(cluster, alice, "gpu:/alice/replay", f"{DST}:/alice/replay")
    assert relay.held.wait(60), "the relay never saw alice's batch"
    written = cluster.data_dir / "cpu" / "alice" / "replay" / "replayed.txt"
    assert written.read_bytes() == marker
    written.unlink()  # alice's run is held open (her transfer registered): what bob replays now would land here
    captured = next(bytes(c) for c in relay.sent if marker in c)
    port = relay.port

    def replay() -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            try:
                s.sendall(captured)
                s.shutdown(socket.SHUT_WR)
                got = 0
                while chunk := s.recv(1 << 16):
                    got += len(chunk)
            except OSError:
                pass
        return 0

    in_child_as(bob, replay)
    time.sleep(0.5)
    assert not written.exists(), "a replayed connection wrote into alice's tree"
    relay.release()
    job = cluster.wait_state(job_id, FINAL, timeout=60)
    assert job["state"] == "COMPLETED", job
    assert "authentication failed" in cluster.tail(DST, 400) or "failed to prove" in cluster.tail(DST, 400)


def _dst_port(cluster) -> int:
    import psutil

    pid = int((cluster.run_dir / f"{DST}.pid").read_text())
    ports = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert len(ports) == 1, ports
    return ports.pop()


@pytest.fixture
def shared(make_cluster, users):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    for part in ("gpu", "cpu"):
        for name, user in users.items():
            owned_dir(cluster.data_dir / part / name, user, 0o755)
    return cluster


def test_a_backtracking_exclude_in_bobs_sync_does_not_hold_up_alices(shared, users):
    alice, bob = users["alice"], users["bob"]
    trap = owned_dir(shared.data_dir / "cpu" / "bob" / "trap", bob, 0o755)
    for i in range(20):
        name = trap / ("a" * 50 + f"{i:05d}")  # 55 characters, all but the end matching, no "b"
        name.write_bytes(b"x")
        os.chown(name, bob.pw_uid, bob.pw_gid)
    _source(shared, bob, "few", {"one.txt": b"bob"})
    _source(shared, alice, "one", {"one.txt": b"alice"})
    bobs = _sync(shared, bob, "gpu:/bob/few", f"{DST}:/bob/trap", exclude=["*a*a*a*a*a*a*a*a*b"], delete=True)
    time.sleep(1.0)  # bob's sync is listing the trap
    alices = shared.wait_state(_sync(shared, alice, "gpu:/alice/one", f"{DST}:/alice/one"), FINAL, timeout=30)
    assert alices["state"] == "COMPLETED", alices
    assert shared.wait_state(bobs, FINAL, timeout=60)["state"] == "COMPLETED"
    assert (shared.data_dir / "cpu" / "alice" / "one" / "one.txt").read_bytes() == b"alice"


def test_too_many_or_too_long_exclude_patterns_are_refused_at_submit(shared, users):
    alice = users["alice"]
    for exclude, why in ((["*.o"] * 65, "at most 64"), (["x" * 1025], "1025 characters")):
        ok, error = test_multiuser.ask(shared, alice, "submit", job=dict(
            kind="sync", src="gpu:/alice", dst=f"{DST}:/alice/x", options={"exclude": exclude}, cwd="/"))
        assert not ok and why in error, error


def test_a_flood_of_slow_connections_to_the_mover_does_not_fail_alices_sync(shared, users):
    alice, bob = users["alice"], users["bob"]
    port = _dst_port(shared)
    _source(shared, alice, "flooded", {"f.txt": b"through the flood", "big.bin": os.urandom(2 << 20)})
    stop_file = shared.run_dir.parent / "stop-flood"

    def flood() -> int:  # as bob, in a child process: 300 connections that never finish a HELLO
        socks = []
        for _ in range(300):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                pass
        while not stop_file.exists():
            for s in socks:
                try:
                    s.send(b"C")  # one byte every 3 s
                except OSError:
                    pass
            time.sleep(3.0)
        return len(socks)

    flooder = threading.Thread(target=in_child_as, args=(bob, flood), daemon=True)
    flooder.start()
    try:
        time.sleep(2.0)  # the flood holds its connections
        job = shared.wait_state(_sync(shared, alice, "gpu:/alice/flooded", f"{DST}:/alice/flooded"), FINAL,
                                timeout=90)
        assert job["state"] == "COMPLETED", job
        assert (shared.data_dir / "cpu" / "alice" / "flooded" / "f.txt").read_bytes() == b"through the flood"
    finally:
        stop_file.write_text("stop")
        flooder.join(15)
