"""The database server launcher (cm.cluster.db) against a real server.

Runs the embedded FerretDB built by `make setup` (fails, not skips, when it is
missing), or the server at MONGODB_URI when that is set.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pymongo
import pytest
from pymongo.errors import DuplicateKeyError

from cm.cluster import db as cmdb

REPO_ROOT = Path(__file__).resolve().parents[1]
EXTERNAL_URI = os.environ.get("MONGODB_URI", "").strip()


def _embedded_plan() -> cmdb.DatabasePlan:
    try:
        return cmdb.ferretdb_plan()
    except cmdb.DatabaseUnavailable as e:
        problem = str(e)
    pytest.fail(problem, pytrace=False)


def _client(uri: str) -> pymongo.MongoClient:
    return pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _refused(sock_path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(str(sock_path))
    except OSError:
        return True
    return False


@pytest.fixture
def server(tmp_path: Path) -> Iterator[cmdb.DatabaseServer]:
    plan = cmdb.DatabasePlan("uri", uri=EXTERNAL_URI) if EXTERNAL_URI else _embedded_plan()
    with cmdb.DatabaseServer(plan) as srv:
        srv.start(tmp_path / "db")
        yield srv


@pytest.fixture
def database(server: cmdb.DatabaseServer) -> Iterator[pymongo.database.Database]:
    assert server.uri
    client = _client(server.uri)
    name = f"cmtest_{uuid.uuid4().hex[:12]}"
    try:
        yield client[name]
    finally:
        client.drop_database(name)
        client.close()


def test_resolve_database_order(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = tmp_path / "cm-ferretdb"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)

    plan = cmdb.resolve_database({"MONGODB_URI": "mongodb://db.example:27017/", "PATH": str(bindir)})
    assert (plan.kind, plan.uri, plan.starts_server) == ("uri", "mongodb://db.example:27017/", False)

    plan = cmdb.resolve_database({"PATH": str(bindir), "CM_FERRETDB_BIN": str(fake)})
    assert (plan.kind, plan.binary) == ("ferretdb", fake)
    assert plan.command(tmp_path / "d") == [
        str(fake), "-listen-unix", str(tmp_path / "d" / "db.sock"), "-dir", str(tmp_path / "d")]

    mongod = bindir / "mongod"
    mongod.write_text("#!/bin/sh\nexit 0\n")
    mongod.chmod(mongod.stat().st_mode | stat.S_IXUSR)
    plan = cmdb.resolve_database({"PATH": str(bindir), "CM_FERRETDB_BIN": str(fake)})
    assert (plan.kind, plan.binary) == ("mongod", mongod)

    with pytest.raises(cmdb.DatabaseUnavailable, match="make setup"):
        cmdb.resolve_database({"PATH": str(tmp_path / "empty"), "CM_FERRETDB_BIN": str(tmp_path / "nope")})


def test_default_binary_is_in_repo_build_dir() -> None:
    assert cmdb.embedded_binary({}) == REPO_ROOT / ".build" / "bin" / "cm-ferretdb"


def test_start_failure_shows_log(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho 'cannot open the data directory: boom' >&2\nexit 3\n")
    broken.chmod(0o755)
    srv = cmdb.DatabaseServer(cmdb.DatabasePlan("ferretdb", binary=broken), start_timeout=10)
    with pytest.raises(cmdb.DatabaseStartError, match="(?s)status 3.*boom"):
        srv.start(tmp_path / "db")
    assert srv.pid is None and srv.uri is None


def test_crud_and_conditional_update(database: pymongo.database.Database) -> None:
    jobs = database.jobs
    jobs.insert_many([{"_id": f"job-{i}", "state": "PENDING", "n": i} for i in range(200)])
    jobs.insert_one({"_id": 7, "state": "PENDING"})

    assert jobs.find_one({"_id": "job-42"}) == {"_id": "job-42", "state": "PENDING", "n": 42}
    assert jobs.count_documents({"state": "PENDING"}) == 201

    # two schedulers race for the same job: only the first one wins
    first = jobs.update_one({"_id": "job-42", "state": "PENDING"}, {"$set": {"state": "RUNNING"}})
    second = jobs.update_one({"_id": "job-42", "state": "PENDING"}, {"$set": {"state": "RUNNING"}})
    assert (first.matched_count, first.modified_count) == (1, 1)
    assert (second.matched_count, second.modified_count) == (0, 0)
    assert jobs.find_one({"_id": "job-42"}) == {"_id": "job-42", "state": "RUNNING", "n": 42}

    # the same with an integer _id and findAndModify
    got = jobs.find_one_and_update({"_id": 7, "state": "PENDING"}, {"$set": {"state": "DONE"}},
                                   return_document=pymongo.ReturnDocument.AFTER)
    assert got == {"_id": 7, "state": "DONE"}
    assert jobs.find_one_and_update({"_id": 7, "state": "PENDING"}, {"$set": {"state": "X"}}) is None

    # _id plus a condition that does not hold matches nothing, for every operation
    assert jobs.find_one({"_id": "job-1", "n": 2}) is None
    assert jobs.count_documents({"_id": "job-1", "n": 2}) == 0
    assert jobs.delete_one({"_id": "job-1", "n": 2}).deleted_count == 0
    assert jobs.delete_one({"_id": "job-1", "n": 1}).deleted_count == 1
    assert jobs.find_one({"_id": "job-1"}) is None
    assert jobs.count_documents({}) == 200


def test_unique_index_rejects_duplicate_insert(database: pymongo.database.Database) -> None:
    nodes = database.nodes
    nodes.create_index("name", unique=True)
    nodes.insert_one({"_id": 1, "name": "n1"})
    with pytest.raises(DuplicateKeyError):
        nodes.insert_one({"_id": 2, "name": "n1"})
    with pytest.raises(DuplicateKeyError):
        nodes.insert_one({"_id": 1, "name": "other"})
    assert list(nodes.find()) == [{"_id": 1, "name": "n1"}]


@pytest.mark.skipif(bool(EXTERNAL_URI), reason="MONGODB_URI is set: no server is started")
def test_stop_leaves_nothing_running_and_data_persists(tmp_path: Path) -> None:
    plan = _embedded_plan()
    srv = cmdb.DatabaseServer(plan)
    uri = srv.start(tmp_path / "db", log_path=tmp_path / "db.log")
    pid, sock = srv.pid, cmdb.socket_path(tmp_path / "db")
    assert uri == cmdb.socket_uri(sock)
    assert pid is not None and srv.running()
    with _client(uri) as client:
        client.cm.counters.insert_one({"_id": "job", "next": 5})
    srv.stop()
    assert srv.pid is None and srv.uri is None and not srv.running()
    assert _gone(pid) and _refused(sock)
    srv.stop()  # idempotent

    with cmdb.DatabaseServer(plan) as again:
        uri = again.start(tmp_path / "db")
        with _client(uri) as client:
            assert client.cm.counters.find_one({"_id": "job"}) == {"_id": "job", "next": 5}
        pid = again.pid
    assert pid is not None and _gone(pid)


@pytest.mark.skipif(bool(EXTERNAL_URI), reason="MONGODB_URI is set: no server is started")
def test_module_entry_point_runs_server_in_foreground(tmp_path: Path) -> None:
    _embedded_plan()
    sock = cmdb.socket_path(tmp_path / "db")
    pidfile = tmp_path / "db.pid"
    env = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cm.cluster.db", "--data-dir", str(tmp_path / "db"), "--pidfile", str(pidfile)],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                cmdb.ping(cmdb.socket_uri(sock), timeout=1)
                break
            except pymongo.errors.PyMongoError:
                assert time.monotonic() < deadline, "server did not answer"
                time.sleep(0.1)
        assert int(pidfile.read_text()) == proc.pid  # exec: the server runs under the launcher's pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
    assert _refused(sock)


def test_a_uri_file_is_read_only_when_it_is_its_readers_alone(tmp_path: Path) -> None:
    from cm.store import StoreError, database_uri

    f = tmp_path / "db.uri"
    f.write_text("mongodb://cm:secret@db.example:27017/?authSource=admin\n")
    f.chmod(0o600)
    assert database_uri("mongodb://ignored/", str(f)) == "mongodb://cm:secret@db.example:27017/?authSource=admin"
    assert database_uri("mongodb://chosen/") == "mongodb://chosen/"
    f.chmod(0o644)
    with pytest.raises(StoreError, match="must belong to uid .* mode 0600 or 0400"):
        database_uri("", str(f))
    f.chmod(0o600)
    link = tmp_path / "link.uri"
    link.symlink_to(f)
    with pytest.raises(StoreError, match="cannot read"):
        database_uri("", str(link))
    from cm.cluster.db import redact

    assert redact("mongodb://cm:secret@db.example:27017/") == "mongodb://cm:***@db.example:27017/"


def test_a_range_pushed_down_on_a_numeric_field_finds_what_the_whole_filter_finds(
        database: pymongo.database.Database) -> None:
    """pushdown.patch item 3: a range on `ended` with the comment cm:range:ended (cm.store.acct) is searched in
    SQLite by the field's index, as JSON text; it must find exactly what the filter means, at the bounds too."""
    import random

    from cm.store.acct import RANGE

    rng = random.Random(7)
    values: list = [rng.uniform(1e9, 1e10) for _ in range(300)] + [rng.randrange(10**9, 10**10) for _ in range(100)]
    values += [1e9, 1e9 + 0.5, 1733100000, 1733100000.0, 1733100000.25, 9999999999.75, 1e10, 2e10, 999999999.5,
               5, 0, -1733100000.0, 1.5e-7, "1733100001", None]
    coll = database["jobs"]
    coll.insert_many([{"_id": i, "ended": v} for i, v in enumerate(values)])
    coll.create_index("ended")
    bounds = [1e9, 1733100000, 1733100000.0, 1733100000.25, 9999999999.75] + [rng.uniform(1e9, 1e10) for _ in range(30)]
    for _ in range(60):
        low, high = sorted(rng.sample(bounds, 2))
        for lo_op, hi_op in (("$gte", "$lt"), ("$gt", "$lte")):
            query = {"ended": {lo_op: low, hi_op: high}}
            expected = {i for i, v in enumerate(values) if isinstance(v, (int, float)) and not isinstance(v, bool)
                        and (v >= low if lo_op == "$gte" else v > low) and (v < high if hi_op == "$lt" else v <= high)}
            assert {d["_id"] for d in coll.find(query, {"_id": 1}, comment=RANGE)} == expected, query
    # a bound outside [1e9, 1e10) is not pushed down, and still right
    assert {d["_id"] for d in coll.find({"ended": {"$gte": 0, "$lt": 1e9 + 1}}, comment=RANGE)} == {
        i for i, v in enumerate(values) if isinstance(v, (int, float)) and 0 <= v < 1e9 + 1}
