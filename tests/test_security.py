"""A hostile user on the head node, as issue 21 tried it, each step against a real cluster with real users.

- bob cannot reach the database: not with the URI of cm.env, not on a loopback
  port, not through the server's Unix socket;
- a dump of the database (api_tokens and jobs, read as root) gives no token
  that works, and a token record written into it opens nothing;
- a capture of an exchange on the API's TCP port holds no token (TLS);
- a token with a lifetime stops working when it ends; plain HTTP off loopback
  is refused at start;
- a flood of connections to the API's TCP port from one address leaves
  alice's requests answered, on api.sock and on TCP.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import resource
import secrets
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pymongo
import pytest

from cm import ApiError, Client
from cm.cluster.db import socket_path
from cm.cluster.local import ClusterError, parse_partitions
from conftest import FAST, Cluster
import test_multiuser
from test_multiuser import ask, in_child_as

users = test_multiuser.users  # the fixture: real users alice and bob (and an operator), made with useradd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(uri: str) -> str:
    """'' if a pymongo client gets an answer at uri, else why not."""
    try:
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=1500, connectTimeoutMS=1500)
        try:
            client.admin.command("ping")
            client.cm.jobs.find_one()
        finally:
            client.close()
    except (pymongo.errors.PyMongoError, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return ""


def tcp_ports_of(pid: int) -> list[int]:
    """The TCP ports process pid listens on (its sockets' inodes matched in /proc/net/tcp{,6})."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture
def own_db_cluster(users):
    """A cluster that starts its own database as `make local-up` does (not the tests' shared server)."""
    if os.environ.get("MONGODB_URI"):
        pytest.skip("MONGODB_URI is set: the local cluster would not start its own server")
    root = tempfile.mkdtemp(prefix="cms")
    os.chmod(root, 0o755)
    cluster = Cluster(Path(root) / "run", parse_partitions("gpu:1,cpu:1", 2), data_dir=Path(root) / "data",
                      db_dir=Path(root) / "db", env={**FAST, "CM_DB_NAME": f"cmsec{os.getpid()}"})
    cluster.home = Path(root) / "home"
    cluster.home.mkdir()
    try:
        cluster.up(timeout=60)
        yield cluster
    finally:
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)


def test_bob_cannot_reach_the_database_by_any_way(own_db_cluster, users):
    cluster = own_db_cluster
    env_text = (cluster.run_dir / "cm.env").read_text()
    db_pid = int(cluster.pidfile("db").read_text())
    ports = tcp_ports_of(db_pid)
    sock = socket_path(cluster.db_dir)
    assert refused(cluster.mongodb_uri) == ""  # root (the head) does get in

    def as_bob():
        tried = {}
        for uri in re.findall(r"mongodb://[^\s'\"]+", env_text):  # whatever cm.env (world-readable) names
            tried[uri] = refused(uri)
        for port in ports + [27017]:
            tried[f"127.0.0.1:{port}"] = refused(f"mongodb://127.0.0.1:{port}/?directConnection=true")
        tried[cluster.mongodb_uri] = refused(cluster.mongodb_uri)
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
            tried[str(sock)] = ""
        except OSError as exc:
            tried[str(sock)] = exc.strerror or str(exc)
        try:  # the directory is closed to bob, whatever mode the server gives its socket
            os.listdir(sock.parent)
            tried[f"listing {sock.parent}"] = ""
        except OSError as exc:
            tried[f"listing {sock.parent}"] = exc.strerror or str(exc)
        return tried

    tried = in_child_as(users["bob"], as_bob)
    assert ports == [], f"the database listens on TCP {ports}: any local user may connect"
    assert "mongodb" not in env_text.lower()
    assert all(tried.values()), f"bob got an answer: {[k for k, v in tried.items() if not v]}"
    assert "Permission denied" in tried[str(sock)]
    assert "Permission denied" in tried[f"listing {sock.parent}"]


def strings_in(value) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(strings_in(k) | strings_in(v) for k, v in value.items())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(strings_in(v) for v in value)) if value else set()
    return set()


def test_a_database_dump_gives_no_token_that_works(make_cluster, users):
    port = free_port()
    cluster = make_cluster("gpu:1,cpu:1", nodes=2, api_port=port)
    alice = users["alice"]
    url, cert = f"https://127.0.0.1:{port}", str(cluster.run_dir / "api.crt")
    ok, data = ask(cluster, alice, "token")
    assert ok, data
    assert Client(url, token=data["token"], cafile=cert).jobs() is not None  # hers works
    src = cluster.data_dir / "gpu" / "dump"
    src.mkdir(parents=True)
    (src / "f").write_text("x")
    job_id = cluster.submit("cmsync", "--wait", "gpu:/dump", "cpu:/dump-copy")
    assert cluster.job(job_id)["state"] == "COMPLETED"

    mongo = pymongo.MongoClient(cluster.mongodb_uri)  # root's, as a backup would read it
    db = mongo[cluster.env["CM_DB_NAME"]]
    dump = list(db.api_tokens.find()) + list(db.jobs.find())
    candidates = {s for s in strings_in(dump) if 8 <= len(s) <= 100}
    # root's token written into the database, as bob did with the old head's open server
    forged = "cm1_" + secrets.token_urlsafe(32)
    db.api_tokens.update_one({"_id": 0}, {"$set": {"user": "root", "generation": 0,
                                                   "hash": hashlib.sha256(forged.encode()).hexdigest()}},
                             upsert=True)
    for token in (forged, "cm2_0.0.0." + secrets.token_urlsafe(32)):
        with pytest.raises(ApiError) as no:
            Client(url, token=token, cafile=cert).submit_command(["id"], cwd="/tmp")
        assert no.value.status == 401

    # every string of the dump as a bearer token, and as the secret of a sync (what the old head derived from)
    for candidate in candidates:
        with pytest.raises(ApiError) as no:
            Client(url, token=candidate, cafile=cert).jobs()
        assert no.value.status == 401, candidate
    from cm.keys import TRANSFER_SECRET, data_plane_key, secret

    sync = db.jobs.find_one({"_id": job_id})["sync"]
    real = data_plane_key(secret(cluster.run_dir, TRANSFER_SECRET), sync.get("nonce", ""), f"{job_id}.1")
    mongo.close()
    derived = {hmac.new(bytes.fromhex(s), f"{job_id}.1".encode(), "sha256").hexdigest()[:32]
               for s in candidates if re.fullmatch(r"(?:[0-9a-f]{2})+", s)}
    assert real not in candidates | derived


class Relay:
    """A TCP relay between a client and the API's port that keeps every byte it passed, both ways."""

    def __init__(self, target: int):
        self.target = target
        self.seen = bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                self.seen += data
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def test_a_capture_of_an_api_exchange_holds_no_token(make_cluster, users):
    port = free_port()
    cluster = make_cluster("cpu:1", nodes=1, api_port=port)
    alice = users["alice"]
    ok, data = ask(cluster, alice, "token")
    assert ok, data
    token = data["token"]
    relay = Relay(port)
    try:
        api = Client(f"https://127.0.0.1:{relay.port}", token=token, cafile=str(cluster.run_dir / "api.crt"))
        job_id = api.submit_command(["sh", "-c", "echo hi"], cwd="/tmp", env=["ALICE_SECRET=s3cr3t-value"])
        assert api.wait(job_id, timeout=30)["user"] == alice.pw_name
        api.close()
    finally:
        relay.close()
    wire = bytes(relay.seen)
    assert len(wire) > 1000  # the exchange went through the relay
    for secret_bytes in (token.encode(), token.split(".")[-1].encode(), b"Bearer", b"ALICE_SECRET", b"s3cr3t-value"):
        assert secret_bytes not in wire


def test_a_token_with_a_lifetime_is_refused_once_it_ends(make_cluster, users):
    port = free_port()
    cluster = make_cluster("cpu:1", nodes=1, api_port=port)
    alice = users["alice"]
    url, cert = f"https://127.0.0.1:{port}", str(cluster.run_dir / "api.crt")
    eight_hours = cluster.cli("cmtoken", "--lifetime", "8h").stdout.strip()
    expires = int(eight_hours.split(".")[2])
    assert abs(expires - (time.time() + 8 * 3600)) < 60
    assert Client(url, token=eight_hours, cafile=cert).jobs() is not None
    assert cluster.cli("cmtoken", "--lifetime", "soon", check=False).returncode == 2
    ok, data = ask(cluster, alice, "token", lifetime=2)
    assert ok, data
    short = data["token"]
    assert Client(url, token=short, cafile=cert).jobs() is not None
    deadline = time.monotonic() + 30
    while True:
        try:
            Client(url, token=short, cafile=cert).jobs()
        except ApiError as exc:
            assert exc.status == 401 and "expired" in exc.message
            break
        assert time.monotonic() < deadline, "a 2 s token still works after 30 s"
        time.sleep(0.2)
    assert time.time() >= int(short.split(".")[2])
    ok, data = ask(cluster, alice, "token")  # her token without a lifetime is untouched
    assert ok and Client(url, token=data["token"], cafile=cert).jobs() is not None


def test_plain_http_off_loopback_is_refused_at_start(make_cluster):
    with pytest.raises(ClusterError, match="not a loopback address and CM_API_TLS is off"):
        make_cluster("cpu:1", nodes=1, api_port=free_port(), api_host="0.0.0.0", api_tls="false")


def test_a_connection_flood_on_the_tcp_port_leaves_alices_requests_answered(make_cluster, users):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 9000:
        pytest.skip(f"RLIMIT_NOFILE {hard} is too low to open 8,300 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = free_port()
    cluster = make_cluster("cpu:1", nodes=1, api_port=port, max_clients_per_user=4, api_timeout=30)
    alice, bob = users["alice"], users["bob"]
    cert = str(cluster.run_dir / "api.crt")
    flood = []
    try:
        for _ in range(8300):  # idle connections from one address: bob's, on 127.0.0.2
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
            flood.append(s)
        sock = str(cluster.run_dir / "api.sock")
        assert in_child_as(alice, lambda: len(Client(sock).jobs()) >= 0)  # api.sock: its own budget
        ok, data = ask(cluster, alice, "token")
        assert ok, data
        assert Client(f"https://127.0.0.1:{port}", token=data["token"], cafile=cert).jobs() is not None
        # bob with a valid token may hold CM_MAX_CLIENTS_PER_USER connections on TCP, and no more
        ok, data = ask(cluster, bob, "token")
        assert ok, data
        held, refused_ = [], []
        for _ in range(6):
            api = Client(f"https://127.0.0.1:{port}", token=data["token"], cafile=cert)
            try:
                api.jobs()
                held.append(api)
            except ApiError as exc:
                refused_.append(exc.status)
        assert (len(held), refused_) == (4, [503, 503])
        assert Client(f"https://127.0.0.1:{port}", token=ask(cluster, alice, "token")[1]["token"],
                      cafile=cert).jobs() is not None
        for api in held:
            api.close()
    finally:
        for s in flood:
            s.close()


def test_a_client_trusts_only_the_certificate_file_it_is_given(make_cluster, tmp_path):
    from cm.api.tls import make_certificate

    port = free_port()
    cluster = make_cluster(api_port=port)
    url = f"https://127.0.0.1:{port}"
    assert Client(url, cafile=str(cluster.run_dir / "api.crt")).version()["api_versions"] == ["v1"]
    impostor = tmp_path / "impostor.crt"  # a head's certificate of the same names, made elsewhere
    make_certificate(impostor, tmp_path / "impostor.key", ["127.0.0.1", "localhost"])
    with pytest.raises((ApiError, OSError)) as refused:
        Client(url, cafile=str(impostor)).version()
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value) or "certificate verify failed" in str(refused.value), \
        refused.value
