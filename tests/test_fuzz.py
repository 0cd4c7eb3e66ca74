"""Fuzzing the three doors of a cluster: the head's client socket, the head's ROUTER, a node's mover.

Hypothesis generates messages, well-formed and not, seeded and bounded in
count; the daemons are real processes. After every run: no daemon died,
each request got an answer (or, for garbage, a closed connection) and
nothing was written that the requesting user could not write. ``make fuzz``
runs many more examples (``CM_FUZZ_EXAMPLES``) from a random seed
(``CM_FUZZ_SEED``, printed, so a failure can be replayed).
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from cm.keys import ensure_keys
from conftest import node_dealer, run_as
from cm.protocol import FRAME_HEADER, TYPES, VERSION, Reply, decode, unframe

EXAMPLES = int(os.environ.get("CM_FUZZ_EXAMPLES", "150"))
SEED = int(os.environ.get("CM_FUZZ_SEED", "8"))  # `make fuzz` picks one at random and prints it
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                suppress_health_check=list(HealthCheck))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(allow_nan=True),
                    st.text(max_size=40), st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=5)),
                      max_leaves=20)
ARG_NAMES = ["kind", "argv", "env", "cwd", "nodes", "procs", "cpus", "mem_mb", "time", "name", "partition", "stdout",
             "stderr", "hold", "requeue", "src", "dst", "options", "job_id", "job_ids", "all", "action", "value",
             "node", "user", "token", "reason", "priority", "uid", "gid"]
OPTION_NAMES = ["delete", "dry_run", "checksum", "exclude", "bwlimit", "policy", "transport", "owners"]
LOCATIONS = st.sampled_from(["gpu:/", "cpu:/", "gpu:/fz", "cpu:/fz", "computenode-1:/x", "gpu:/../etc",
                             "cpu:/fz/../../", "nowhere:/x", "gpu:", ":/", "gpu:/fz/\x00"])
args = st.dictionaries(st.sampled_from(ARG_NAMES), st.one_of(values, LOCATIONS,
                       st.dictionaries(st.sampled_from(OPTION_NAMES), values, max_size=4)), max_size=8)
requests = st.builds(lambda envelope, fields, job: {**fields, **envelope, **({"job": job} if job is not None else {})},
                     st.fixed_dictionaries({
                         "v": st.sampled_from([VERSION, VERSION, 0, "1"]),
                         "t": st.sampled_from(["submit", "submit", "cancel", "info", "control", "ping", "stats", "nope",
                                               "reply", "x"]),
                         "id": st.one_of(st.text(min_size=1, max_size=8), values)}),
                     args, st.one_of(st.none(), args, values))


@pytest.fixture(scope="module")
def fuzzer_user():
    if os.geteuid() != 0:
        pytest.skip("needs root to fuzz as an unprivileged user")
    return pwd.getpwnam("nobody")


def files_not_owned_by(root: Path, uid: int) -> dict:
    """Every path under root that uid does not own, with what it is: must not change while uid fuzzes."""
    out = {}
    for p in [root, *root.rglob("*")]:
        st_ = p.lstat()
        if st_.st_uid != uid:
            out[str(p)] = (st_.st_uid, st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return out


def test_fuzzed_requests_on_the_client_socket_each_get_an_answer_and_write_nothing_foreign(make_cluster, fuzzer_user):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, client_timeout=2)
    data = cluster.data_dir
    before = files_not_owned_by(data, fuzzer_user.pw_uid)
    sock_path = str(cluster.run_dir / "head.sock")

    def fuzz() -> int:
        answered = [0]

        @seed(SEED)
        @FUZZ
        @given(st.one_of(requests.map(lambda r: msgpack.packb(r, use_bin_type=True)), st.binary(max_size=300)))
        def one(body: bytes) -> None:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(sock_path)
                s.sendall(len(body).to_bytes(FRAME_HEADER, "big") + body)
                buf = bytearray()
                while (reply := unframe(buf)) is None:
                    chunk = s.recv(1 << 16)
                    assert chunk, f"closed without an answer to {body[:80]!r}"
                    buf += chunk
                msg = decode(reply)
                assert isinstance(msg, Reply)
                assert msg.ok or msg.error, "a refusal says why"
                assert "internal error" not in (msg.error or ""), (body[:200], msg.error)
                answered[0] += 1

        one()
        return answered[0]

    assert run_as(fuzzer_user.pw_uid, fuzzer_user.pw_gid, fuzz) >= EXAMPLES // 2
    cluster.assert_daemons_alive()
    time.sleep(1.0)  # whatever was accepted has had time to run
    assert files_not_owned_by(data, fuzzer_user.pw_uid) == before
    assert len(cluster.info()["nodes"]) == 4
    assert set(cluster.node_states().values()) <= {"IDLE", "MIXED", "ALLOCATED"}


def node_messages():
    kinds = sorted(TYPES)
    return st.one_of(
        st.binary(max_size=200),
        st.builds(lambda t, fields: msgpack.packb({"v": VERSION, "t": t, "id": "f", **fields}, use_bin_type=True),
                  st.sampled_from(kinds),
                  st.dictionaries(st.sampled_from(["node", "job_id", "run", "state", "exit_code", "reason", "running",
                                                   "stats", "partition", "cpus", "mem_mb", "version", "incarnation",
                                                   "transfer_addr", "data_root", "ref", "message", "spec", "kill"]),
                                  st.one_of(values, st.just("fuzznode")), max_size=8)))


def test_fuzzed_node_messages_on_the_router_never_take_the_head_down(make_cluster):
    cluster = make_cluster("gpu:1,cpu:1", nodes=2)
    ensure_keys(cluster.run_dir, ["fuzznode"])  # an authenticated peer: the worst the network can be
    time.sleep(0.5)  # the head rereads the authorised keys on its next tick
    dealer = node_dealer(cluster, "fuzznode")
    errors = [0]

    @seed(SEED + 1)
    @FUZZ
    @given(node_messages())
    def one(payload: bytes) -> None:
        dealer.send(payload)
        while dealer.poll(0):
            dealer.recv()
            errors[0] += 1

    try:
        one()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and dealer.poll(200):
            dealer.recv()
            errors[0] += 1
    finally:
        dealer.close()
    assert errors[0] > 0  # malformed messages are answered with errors
    cluster.assert_daemons_alive()
    assert {n["name"] for n in cluster.info()["nodes"]} >= {"computenode-1", "computenode-2"}
    job_id = cluster.submit("cmrun", "--wait", "true")
    assert cluster.job(job_id)["state"] == "COMPLETED"


@pytest.fixture
def open_dir():
    """A fresh directory every user can traverse (pytest's tmp_path is under a 0700 folder)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="cmfz"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_fuzzed_frames_on_the_mover_port_never_kill_it_or_write_outside_the_transfer(open_dir, fuzzer_user):
    from cm.creds import Identity
    from cm.node.mover import Mover
    from cm.transfer.wire import HEADER, MAGIC, VERSION as WIRE_VERSION, Kind, ProtocolError

    tmp_path = open_dir
    root = tmp_path / "data"
    (root / "fz").mkdir(parents=True)
    os.chown(root / "fz", fuzzer_user.pw_uid, fuzzer_user.pw_gid)
    (root / "other").mkdir()
    (root / "other" / "keep.txt").write_text("not the fuzzer's\n")
    (root / "after").mkdir()  # the real transfer after the fuzzing writes here
    os.chmod(tmp_path, 0o755)
    before = files_not_owned_by(root, fuzzer_user.pw_uid)
    mover = Mover("127.0.0.1", 0, chunk_size=1 << 20)
    mover.start()
    who = Identity(fuzzer_user.pw_uid, fuzzer_user.pw_gid, ())
    mover.register("t-1", "secret-token", root, "/fz", who)
    kinds = [int(k) for k in Kind] + [0, 99, 255]
    paths = st.sampled_from([b"a", b"d/b", b"../x", b"/etc/passwd", b"", b"..", b"d/../../y", b"\xff\xfe", b"a\0b"])
    metas = st.dictionaries(st.sampled_from(["transfer_id", "token", "path", "size", "index", "mode", "mtime",
                                             "chunk_size", "files", "dirs", "paths", "links", "entries", "exclude",
                                             "page", "uid", "gid"]),
                            st.one_of(values, paths, st.lists(st.lists(st.one_of(paths, values), max_size=5),
                                                              max_size=4)), max_size=8)
    modes, mtimes = st.integers(0, 0o7777), st.integers(-(1 << 40), 1 << 62)
    fitting = st.one_of(  # requests that fit their schema, with hostile paths: they reach the file system
        st.builds(lambda d: (Kind.MKDIRS, {"dirs": d}), st.lists(st.tuples(paths, modes).map(list), max_size=4)),
        st.builds(lambda p: (Kind.DELETE, {"paths": p}), st.lists(paths, max_size=4)),
        st.builds(lambda links: (Kind.SYMLINKS, {"links": links}),
                  st.lists(st.tuples(paths, st.sampled_from([b"/etc/shadow", b"../..", b"x"]), mtimes).map(list),
                           max_size=3)),
        st.builds(lambda f: (Kind.META, {"files": f}), st.lists(st.tuples(paths, modes, mtimes).map(list), max_size=3)),
        st.builds(lambda f: (Kind.DIRMETA, {"dirs": f}), st.lists(st.tuples(paths, modes, mtimes).map(list), max_size=3)),
        st.builds(lambda f: (Kind.OWNERS, {"entries": f}),
                  st.lists(st.tuples(paths, st.integers(0, 2), st.integers(0, 2), modes).map(list), max_size=3)),
        st.builds(lambda p: (Kind.MANIFEST, {"exclude": [], "page": p}), st.integers(0, 3)),
        st.builds(lambda e: (Kind.SPECIALS, {"entries": e}),
                  st.lists(st.tuples(paths, st.sampled_from(["p", "s", "c", "b"]), modes, mtimes,
                                     st.integers(0, 1 << 20)).map(list), max_size=3)),
        st.builds(lambda links: (Kind.HARDLINKS, {"links": links}),
                  st.lists(st.tuples(paths, paths).map(list), max_size=3)),
        st.builds(lambda e, ns: (Kind.XATTRS, {"namespaces": ns, "entries": e}),
                  st.lists(st.tuples(paths, modes, st.lists(st.tuples(
                      st.sampled_from([b"user.a", b"trusted.x", b"security.capability", b"system.posix_acl_access"]),
                      st.binary(max_size=16)).map(list), max_size=2)).map(list), max_size=3),
                  st.lists(st.sampled_from([b"user.", b"trusted.", b"system.posix_acl_access"]), max_size=2)),
    )
    frames = st.one_of(
        st.tuples(st.sampled_from(kinds), metas, st.binary(max_size=64), st.booleans(), st.booleans()),
        fitting.map(lambda km: (km[0], km[1], b"", False, False)),
    )
    port = mover.port
    nonces = st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40), values)
    handshakes = st.one_of(  # what an attacker without the key can say first: HELLO and AUTH, fitting or not
        st.builds(lambda n, p: [(Kind.HELLO, {"transfer_id": "t-1", "nonce": n}), (Kind.AUTH, {"proof": p})],
                  nonces, nonces),
        st.lists(st.tuples(st.sampled_from([Kind.HELLO, Kind.AUTH, Kind.BATCH, 0, 255]), metas), max_size=3),
    )
    answered = {"ok": 0, "error": 0}

    def replies(chan) -> list[tuple[int, dict]]:
        """Every frame the mover sent on chan (sealed after a handshake) until it closed it: (kind, fields)."""
        out = []
        while True:
            try:
                kind, raw, plen = chan._recv_frame()
            except (OSError, ProtocolError):  # closed (with our frames unread, or a record cut short)
                return out
            assert plen == 0, (kind, plen)
            out.append((kind, msgpack.unpackb(bytes(raw))))

    @seed(SEED + 2)
    @FUZZ
    @given(st.booleans(), handshakes, st.lists(frames, min_size=1, max_size=4))
    def one(keyed, opening, sequence) -> None:
        from cm.transfer.connection import handshake
        from cm.transfer.wire import Channel

        assert mover.proc.poll() is None, "the mover died"  # its socket still takes connections: nobody answers
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:  # a silent mover fails the test
            chan = Channel(s)
            if keyed:  # an authenticated peer (the worst the network can be): its frames are sealed
                handshake(chan, "t-1", "secret-token")
            else:
                try:
                    for kind, meta in opening:
                        body = msgpack.packb(meta, use_bin_type=True)
                        s.sendall(HEADER.pack(MAGIC, WIRE_VERSION, kind, len(body), 0) + body)
                except OSError:
                    pass  # the mover closed on us: its answers are read below
            for kind, meta, payload, lie, garbage in sequence:
                body = os.urandom(len(payload)) if garbage else msgpack.packb(meta, use_bin_type=True)
                plen = len(payload) + (7 if lie else 0)
                try:
                    chan.io.send([HEADER.pack(MAGIC, WIRE_VERSION, kind, len(body), plen) + body + payload])
                except OSError:
                    break  # the mover closed on us: its answers are read below
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            got = replies(chan)
        if not keyed:  # no key: a challenge at most, and never a frame of the transfer's
            assert all(kind in (Kind.OK, Kind.ERROR) for kind, _ in got), got
            assert not any("internal error" in str(fields) for _, fields in got), got
            assert mover.proc.poll() is None, f"the mover died on {opening}, {sequence}"
            return
        for kind, fields in got:
            assert kind in (Kind.OK, Kind.ERROR), (kind, fields)
            if kind == Kind.ERROR:
                assert "internal error" not in fields.get("message", ""), (sequence, fields)  # a handler bug
                answered["error"] += 1
            else:
                answered["ok"] += 1
        assert mover.proc.poll() is None, f"the mover died on {sequence}"

    try:
        one()
        assert answered["error"] and answered["ok"], answered  # both kinds of answer were read
        mover.check()  # as the node daemon's supervisor does: a dead mover would be started again here
        assert mover.proc.poll() is None and mover.starts == 1, "the mover died and was restarted"
        # a real transfer through the same mover, as root (the fuzzer may have made its own directory
        # unreadable, as its owner may)
        src = tmp_path / "src"
        (src / "d").mkdir(parents=True)
        (src / "d" / "f.bin").write_bytes(os.urandom(3 << 20))
        (src / "small").write_text("small\n")
        os.symlink("d/f.bin", src / "link")
        mover.register("t-2", "tok", root, "/after", Identity(0, 0, ()))
        spec = {"transfer_id": "t-2", "token": "tok", "src_root": str(src), "src_path": "/",
                "dst_host": "127.0.0.1", "dst_port": port, "rank": 0, "nranks": 1, "policy": "round-robin",
                "delete": False, "dry_run": False, "checksum": False, "exclude": [], "bwlimit": None,
                "streams": 2, "chunk_size": 1 << 20}
        sent = subprocess.run([sys.executable, "-m", "cm.transfer.send"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        assert (root / "after" / "d" / "f.bin").read_bytes() == (src / "d" / "f.bin").read_bytes()
        assert (root / "after" / "small").read_text() == "small\n"
        assert os.readlink(root / "after" / "link") == "d/f.bin"
        assert mover.starts == 1
    finally:
        mover.stop()
    def outside_after(found: dict) -> dict:
        return {p: v for p, v in found.items() if not p.startswith(str(root / "after"))}

    assert outside_after(files_not_owned_by(root, fuzzer_user.pw_uid)) == outside_after(before)
    for p in (root / "fz").rglob("*"):
        assert p.lstat().st_uid == fuzzer_user.pw_uid, p


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread credentials are Linux's")
def test_acting_as_a_user_in_one_thread_leaves_the_others_root(open_dir, fuzzer_user):
    import threading

    from cm.creds import Identity, acting_as

    tmp_path = open_dir
    seen = {}
    go, done = threading.Event(), threading.Event()

    def other():
        go.wait()
        (tmp_path / "by-root").write_text("x")
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with acting_as(Identity(fuzzer_user.pw_uid, fuzzer_user.pw_gid, ())):
        with pytest.raises(PermissionError):
            (tmp_path / "by-nobody").write_text("x")
        go.set()
        done.wait(5)
    t.join()
    seen["root"] = (tmp_path / "by-root").stat().st_uid
    (tmp_path / "again").write_text("x")  # root again after the block
    assert seen["root"] == 0 and (tmp_path / "again").stat().st_uid == 0


def test_each_run_of_a_sync_has_its_own_128_bit_token_and_one_runs_token_opens_no_other(open_dir):
    import secrets

    from cm.head.specs import node_spec
    from cm.transfer.receiver import TransferServer

    job = {"_id": 5, "kind": "sync", "runs": 1, "name": "s", "user": "u", "uid": 0, "gid": 0, "time_limit": 60,
           "cwd": "/", "sync": {"nonce": secrets.token_hex(16), "src": {"path": "/a"}, "dst": {"path": "/b"},
                                "options": {}},
           "slots": [{"node": "n1", "role": "src", "rank": 0}, {"node": "n2", "role": "dst", "rank": 0}]}
    head_secret = secrets.token_bytes(32)
    first = node_spec(job, job["slots"][1], {}, head_secret).transfer
    job["runs"] = 2
    second = node_spec(job, job["slots"][1], {}, head_secret).transfer
    assert first.transfer_id == "5.1" and second.transfer_id == "5.2"
    assert len(bytes.fromhex(first.token)) == 16 and first.token != second.token
    assert node_spec(job, job["slots"][0], {"n2": "h:1"}, head_secret).transfer.token == second.token
    server = TransferServer("127.0.0.1", 0)
    server.start()
    try:
        server.register("5.2", second.token, open_dir, "/b")

        def hello(tid: str, token: str) -> bool:
            from cm.transfer.connection import handshake
            from cm.transfer.secure import AuthError
            from cm.transfer.wire import Channel

            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                try:
                    handshake(Channel(s), tid, token)
                except AuthError:
                    return False
                return True

        assert not hello("5.2", first.token)
        assert hello("5.2", second.token)
    finally:
        server.stop()
