"""Every integer field of every stored document at 2^63-1, through the real database, the store's typed
records, the head's views and the encoders: nothing read from MongoDB may reach a client as a driver type
(bson.int64.Int64 is what MongoDB hands back for a number past 32 bits), and nothing in between may
overflow."""

from __future__ import annotations

import json
import socket
import time

import msgspec
import pytest

from cm import store
from cm.head.clients import ClientServer
from cm.head.requests import job_view
from cm.protocol import FRAME_HEADER, InfoData, JobView, NodeView, Info, Reply, SyncStats, decode, encode
from cm.store import documents, records
from cm.store import intercom as intercom_store

MAX = (1 << 63) - 1
PAIRS = [(documents.Job, records.JobRecord), (documents.Slot, records.SlotRecord),
         (documents.Node, records.NodeRecord), (documents.Counter, records.CounterRecord),
         (documents.Policy, records.PolicyRecord), (documents.IntercomKey, records.IntercomKeyRecord),
         (documents.ApiToken, records.TokenRecord)]


@pytest.mark.parametrize("document,record", PAIRS, ids=[d.__name__ for d, _ in PAIRS])
def test_each_record_declares_exactly_its_documents_fields(document, record):
    stored = {f.db_field for f in document._fields.values()}
    typed = {f.encode_name for f in msgspec.structs.fields(record)}
    assert typed == stored


def test_the_heads_record_types_name_the_same_fields():
    from cm.head import records as head

    for typed_dict, record in ((head.Job, records.JobRecord), (head.SlotRecord, records.SlotRecord)):
        assert set(typed_dict.__annotations__) == {f.encode_name for f in msgspec.structs.fields(record)}


def maxed(t: msgspec.inspect.Type, keys=("k",)):
    """A value of type t with every integer in it at 2^63-1 (every container holds one of each)."""
    i = msgspec.inspect
    if isinstance(t, i.IntType):
        return MAX
    if isinstance(t, i.FloatType):
        return 1.5
    if isinstance(t, i.StrType):
        return "x"
    if isinstance(t, i.BoolType):
        return True
    if isinstance(t, i.UnionType):
        return maxed(next(u for u in t.types if not isinstance(u, i.NoneType)), keys)
    if isinstance(t, i.ListType):
        return [maxed(t.item_type)]
    if isinstance(t, i.DictType):
        return {k: maxed(t.value_type) for k in keys}
    if isinstance(t, i.StructType):
        return {f.encode_name: maxed(f.type, STATS if f.name == "stats" else ("k",)) for f in t.fields}
    raise AssertionError(f"no maxed value for {t}")


STATS = tuple(f.name for f in msgspec.structs.fields(SyncStats) if f.type is not float)


def maxed_doc(record):
    return maxed(msgspec.inspect.type_info(record))


def plain_types_only(value, where="$"):
    """Every value is a builtin of JSON's kinds, ints exactly int (not a subclass such as bson's Int64)."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert type(k) is str, where
            plain_types_only(v, f"{where}.{k}")
    elif isinstance(value, list):
        for n, v in enumerate(value):
            plain_types_only(v, f"{where}[{n}]")
    else:
        assert type(value) in (int, float, str, bool, type(None)), f"{where}: {type(value)}"


def ints_at_max(value, where="$") -> list[str]:
    """Where the record holds an integer (a bool is no integer here)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in ints_at_max(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for n, v in enumerate(value) for p in ints_at_max(v, f"{where}[{n}]")]
    if type(value) is int:
        assert value == MAX, where
        return [where]
    return []


@pytest.fixture
def db(database_uri, db_name):
    store.connect(database_uri, db_name)
    yield
    documents.Job._get_db().client.drop_database(db_name)
    store.disconnect()


def test_a_job_with_every_integer_at_2_63_minus_1_round_trips_to_every_view_and_encoder(db):
    fields = maxed_doc(records.JobRecord)
    fields.update(kind="sync", state="COMPLETED", ended=time.time(), env=["A=1"])
    fields["slots"][0].update(role="src", state="COMPLETED")
    fields["sync"]["src"] = {"partition": "gpu", "path": "/a"}
    fields["sync"]["dst"] = {"node": "n1", "path": "/b"}
    fields["sync"].update(transport="tcp")
    fields["sync"]["options"]["policy"] = "size-balanced"
    fields["id"] = fields.pop("_id")
    stored = store.insert_job(fields)
    assert len(ints_at_max(stored)) >= 30  # every counter of the job, its slot, its options and progress

    for job in (store.get_job(MAX), *store.active_jobs(), *store.recent_jobs(None), store.job_by_key(MAX, "x")):
        if job is None or job["_id"] != MAX:
            continue
        plain_types_only(job)
        assert ints_at_max(job) == ints_at_max(stored)
        view = job_view(job)
        reply = Reply(ok=True, data=InfoData(nodes=[], jobs=[view]))
        back = decode(encode(reply))  # the command socket's msgpack
        assert msgspec.convert(back.data["jobs"][0], JobView) == view  # within every view type's range
        assert view.transfer is not None
        assert (view.transfer.bytes_total, view.transfer.files_total, view.transfer.retries) == (MAX, MAX, MAX)
        assert json.loads(msgspec.json.encode(view))["transfer"]["stats"]["bytes_sent"] == MAX  # the HTTP API's


def test_the_other_documents_at_2_63_minus_1_come_back_as_plain_ints(db):
    node = maxed_doc(records.NodeRecord)
    name = node.pop("_id")
    node["state"] = "UP"
    store.save_node(name, **node)
    (got,) = store.all_nodes()
    plain_types_only(got)
    assert len(ints_at_max(got)) == 2
    row = NodeView(name=got["_id"], partition=got["partition"], state="IDLE", cpus=got["cpus"], cpus_free=got["cpus"],
                   mem_mb=got["mem_mb"], mem_free_mb=got["mem_mb"])
    assert msgspec.convert(decode(encode(Reply(ok=True, data=InfoData(nodes=[row])))).data["nodes"][0], NodeView) == row

    store.set_token(MAX, "u", MAX)
    record = store.token_record(MAX)
    plain_types_only(record)
    assert ints_at_max(record) == ["$._id", "$.generation"]

    documents.Counter._get_collection().insert_one({"_id": "job", "seq": MAX - 1})
    assert store.reserve_job_ids(1) == range(MAX, MAX + 1)

    intercom_store.apply([("save", MAX, MAX, "k", "v", MAX)])
    assert intercom_store.load_keys(MAX, MAX) == {"k": ("v", MAX)}
    assert intercom_store.jobs_with_keys() == [MAX]


def test_a_reply_that_cannot_be_encoded_costs_that_client_an_error_and_is_logged_with_its_job(tmp_path, caplog):
    from bson.int64 import Int64

    server = ClientServer(tmp_path / "s.sock", "")
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(tmp_path / "s.sock"))
    try:
        server.accept()
        (conn,) = server.conns.values()
        bad = Reply(ok=True, data={"bytes": Int64(5 << 32)})
        server.send(conn, bad, Info(job_id=7))
        client.settimeout(5)
        data = client.recv(1 << 16)
        reply = decode(data[FRAME_HEADER:])
        assert not reply.ok and reply.code == "internal"
        logged = [r for r in caplog.records if r.getMessage() == "reply not encodable"]
        assert logged and logged[0].fields["jobs"] == [7]
        assert conn.fd in server.conns  # the connection, and the server, go on
        server.send(conn, Reply(ok=True, data={"fine": 1}))
        assert decode(client.recv(1 << 16)[FRAME_HEADER:]).data == {"fine": 1}
    finally:
        client.close()
        server.shutdown()

