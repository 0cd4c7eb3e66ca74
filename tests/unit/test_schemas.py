"""The schemas at the boundaries: what does not fit is refused naming the field; the head has no import cycle."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import msgpack
import msgspec
import pytest

from cm import __version__
from cm.protocol import (
    REQUESTS,
    VERSION,
    CommandShare,
    Error,
    ErrorCode,
    OtherVersion,
    Progress,
    ProtocolError,
    RunJob,
    SubmitCommand,
    SubmitSync,
    SyncCounters,
    SyncStats,
    Submit,
    decode,
    encode,
    version_refusal,
)


def request(op: str, fields: dict):
    """A client's request as the head decodes it off its socket."""
    return decode(msgpack.packb({**fields, "t": op, "v": VERSION, "id": "r1"}))

SHARE = dict(run=1, rank=0, name="j", user="ann", uid=1000, gid=1000, time_limit=60.0, cwd="/home/ann")


def test_a_run_job_travels_with_its_typed_spec():
    msg = RunJob(job_id=4, spec=CommandShare(**SHARE, argv=["true"], env=[], procs=1, nnodes=1, nodelist=["n1"],
                                             stdout="", stderr="", cpus=1))
    back = decode(encode(msg))
    assert back == msg and back.spec.role == "run" and back.spec.kind == "command"


@pytest.mark.parametrize("spec,field", [
    ({"role": "run", **SHARE}, "argv"),  # a command share without its command
    ({"role": "src", **SHARE, "transfer": {}}, "transfer"),
    ({"role": "bogus", **SHARE}, "spec.role"),
    ({"role": "run", **SHARE, "uid": -1, "argv": ["x"], "env": [], "procs": 1, "nnodes": 1, "nodelist": [],
      "stdout": "", "stderr": "", "cpus": 1}, "spec.uid"),
])
def test_a_run_job_whose_spec_does_not_fit_is_refused_naming_the_field(spec, field):
    raw = msgpack.packb({"t": "run_job", "v": VERSION, "id": "x", "job_id": 1, "spec": spec})
    with pytest.raises(ProtocolError, match=field.replace(".", r"\.")):
        decode(raw)


def test_progress_counters_are_typed_and_a_bad_counter_is_refused():
    msg = Progress(job_id=1, node="n", run=1, counters=SyncCounters(bytes_done=1, bytes_total=2, files_done=1,
                                                                     files_total=1, rate=0.5),
                   stats=SyncStats(files_sent=3, elapsed=0.25))
    assert decode(encode(msg)).stats.files_sent == 3
    raw = msgpack.packb({**msgpack.unpackb(encode(msg)), "stats": {"files_sent": True}})
    with pytest.raises(ProtocolError, match="stats.files_sent"):
        decode(raw)


def test_an_error_carries_a_code_a_program_can_act_on():
    back = decode(encode(Error(ref="r", message="unknown node: say hello", code=ErrorCode.UNKNOWN_NODE)))
    assert back.code is ErrorCode.UNKNOWN_NODE
    raw = msgpack.packb({"t": "error", "v": VERSION, "id": "x", "ref": "r", "message": "m", "code": "whatever"})
    with pytest.raises(ProtocolError, match="code"):
        decode(raw)


def test_a_message_of_another_version_is_refused_as_such():
    with pytest.raises(ProtocolError, match=f"protocol version 1, expected {VERSION}"):
        decode(msgpack.packb({"t": "heartbeat", "v": 1, "id": "x", "node": "n", "running": [], "old": 1}))


def test_a_hello_of_another_version_still_says_its_node_and_release_and_the_refusal_names_both():
    with pytest.raises(OtherVersion) as caught:
        decode(msgpack.packb({"t": "hello", "v": VERSION - 1, "node": "computenode-1", "version": "0.0.9",
                              "cpus": "changed meaning"}))
    said = caught.value.envelope
    assert (said.t, said.v, said.node, said.version) == ("hello", VERSION - 1, "computenode-1", "0.0.9")
    assert version_refusal("computenode-1", said.version, said.v) == (
        f"node computenode-1 runs cm 0.0.9 (protocol {VERSION - 1}); this head runs cm {__version__} "
        f"(protocol {VERSION}): upgrade the node")
    assert version_refusal("n", None, VERSION + 1).endswith(f"n speaks protocol {VERSION + 1}; this head runs cm "
                                                            f"{__version__} (protocol {VERSION}): upgrade the head")
    # a message without "v" is of this version: refused for its fields, not as another version
    with pytest.raises(ProtocolError, match="running") as caught:
        decode(msgpack.packb({"t": "heartbeat", "id": "x", "node": "n", "running": "x"}))
    assert not isinstance(caught.value, OtherVersion)


@pytest.mark.parametrize("args,field", [
    ({"argv": []}, "argv"),
    ({"argv": ["x"], "nodes": True}, "nodes"),  # an int, not a bool
    ({"argv": ["x"], "env": ["=x"]}, "env"),
    ({"argv": ["x"], "priority": 5000}, "priority"),
    ({"kind": "sync", "src": "a:/x", "dst": "b:/y", "options": {"transport": "carrier-pigeon"}}, "options.transport"),
    ({"kind": "sync", "src": "a:/x", "dst": "b:/y", "options": {"bwlimit": 0}}, "options.bwlimit"),
    ({"kind": "batch"}, "kind"),
])
def test_submit_arguments_that_do_not_fit_are_refused_naming_the_field(args, field):
    with pytest.raises(ProtocolError, match="job." + field.replace(".", r"\.")):
        request("submit", {"job": {"kind": "command", **args}})


def test_a_submit_names_its_kind_and_unknown_fields_are_ignored():
    submit = request("submit", {"job": {"kind": "command", "argv": ["true"], "user": "root", "uid": 0}, "uid": 0})
    assert isinstance(submit, Submit) and isinstance(submit.job, SubmitCommand) and submit.job.argv == ["true"]
    assert isinstance(request("submit", {"job": {"kind": "sync", "src": "a:/x", "dst": "b:/y"}}).job, SubmitSync)
    with pytest.raises(ProtocolError, match="kind"):
        request("submit", {"job": {"argv": ["true"]}})


def test_an_unknown_operation_is_refused_as_one():
    from cm.protocol import UnknownType

    with pytest.raises(UnknownType, match="unknown operation 'explode'"):
        request("explode", {})


@pytest.mark.parametrize("op,args,field", [
    ("cancel", {"job_ids": []}, "job_ids"), ("cancel", {"job_ids": ["one"]}, "job_ids[0]"),
    ("wait", {"job_id": 1, "timeout": 61}, "timeout"), ("info", {"job_id": True}, "job_id"),
    ("control", {"action": "explode"}, "action"), ("control", {"action": "priority", "value": "urgent"}, "value"),
    ("control", {"action": "priority", "value": 5000}, "value"),
    ("submit", {"job": {"kind": "command", "argv": ["x"], "labels": {"a.b": "c"}}}, "labels"),  # a document key: no '.'
    ("submit", {"job": {"kind": "command", "argv": ["x"], "labels": {f"k{i}": "v" for i in range(33)}}}, "labels"),
    ("submit", {"job": {"kind": "command", "argv": ["x"], "idempotency_key": ""}}, "idempotency_key"),
    ("info", {"state": ["SLEEPING"]}, "state[0]"), ("info", {"label": ["workflow"]}, "label[0]"),
    ("info", {"user": ""}, "user"), ("delete", {}, "job_id"), ("delete", {"job_id": -1}, "job_id"),
    ("token", {"revoke": "x" * 65}, "revoke"),
])
def test_other_arguments_that_do_not_fit_are_refused_naming_the_field(op, args, field):
    with pytest.raises(ProtocolError, match=field.replace("[", r"\[").replace("]", r"\]")):
        request(op, args)


def test_every_request_type_has_a_json_schema():
    schemas, components = msgspec.json.schema_components(REQUESTS)
    assert {"SubmitCommand", "SubmitSync", "SyncOptions", "Cancel", "Info", "Wait", "Control", "Delete", "Token",
            "Metrics"} <= set(components)
    assert components["SubmitCommand"]["properties"]["nodes"]["maximum"] == 4096


def test_the_http_bodies_are_the_protocols_request_types_with_the_same_limits():
    from cm.api import types

    _, protocol = msgspec.json.schema_components(REQUESTS)
    _, http = msgspec.json.schema_components([types.JobSubmission, types.AdminRequest])
    not_in_body = ("t", "v", "id", "kind", "type", "idempotency_key", "options", "action", "token")  # tags,
    # the envelope, a header, the path, flattened

    def fields(schema: dict) -> dict:
        return {k: v for k, v in schema["properties"].items() if k not in not_in_body}

    assert fields(http["CommandJob"]) == fields(protocol["SubmitCommand"])
    assert fields(http["SyncJob"]) == {**fields(protocol["SubmitSync"]), **fields(protocol["SyncOptions"])}
    assert fields(http["AdminRequest"]) == fields(protocol["Control"])
    body = msgspec.json.decode(b'{"type": "sync", "src": "a:/x", "dst": "b:/y", "checksum": true, '
                               b'"labels": {"workflow": "w1"}}', type=types.JobSubmission)
    args = types.submitted(body, idempotency_key="k")
    assert isinstance(args, SubmitSync) and args.options.checksum and args.labels == {"workflow": "w1"}
    assert args.idempotency_key == "k"


def test_every_error_code_has_an_http_status():
    from cm.api.routes import status_of

    assert {code: status_of(code) for code in ErrorCode} == {
        ErrorCode.BAD_MESSAGE: 400, ErrorCode.UNKNOWN_NODE: 400, ErrorCode.UNKNOWN_OPERATION: 400,
        ErrorCode.REFUSED: 400, ErrorCode.NOT_FOUND: 404, ErrorCode.FORBIDDEN: 403, ErrorCode.CONFLICT: 409,
        ErrorCode.DB_UNAVAILABLE: 503, ErrorCode.INTERNAL: 500,
        ErrorCode.LIMIT: 413, ErrorCode.ENDED: 409, ErrorCode.TIMEOUT: 408, ErrorCode.HEAD_UNAVAILABLE: 503}


def test_the_head_package_has_no_import_cycle():
    head = Path(__file__).resolve().parents[2] / "cm" / "head"
    deps = {}
    for path in head.glob("*.py"):
        tree = ast.parse(path.read_text())
        deps[f"cm.head.{path.stem}"] = {n.module for n in ast.walk(tree)
                                        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("cm.head.")}

    def visit(module: str, path: tuple[str, ...]) -> None:
        for dep in deps.get(module, ()):
            assert dep not in path, f"import cycle: {' -> '.join(path + (dep,))}"
            visit(dep, path + (dep,))

    for module in deps:
        visit(module, (module,))


def test_every_stored_field_of_a_job_record_is_declared_in_the_document_and_nothing_else():
    from cm.head.records import Job, SlotRecord
    from cm.store import documents

    stored = set(Job.__annotations__)
    declared = {"_id" if name == "id" else name for name in documents.Job._fields}
    assert stored == declared
    assert set(SlotRecord.__annotations__) == set(documents.Slot._fields)


def test_the_senders_final_report_fits_sync_stats_field_for_field():
    from cm.transfer.stats import Stats

    report = Stats(bytes_sent=5, files_sent=2).report(1.5, would=["x"])
    counters = {k: v for k, v in report.items() if k not in ("done", "would")}
    assert set(counters) == set(SyncStats.__struct_fields__)
    assert msgspec.convert(counters, SyncStats) == SyncStats(bytes_sent=5, files_sent=2, elapsed=1.5)


ASK = {"v": VERSION, "id": "x", "node": "n1", "job_id": 4, "run": 1, "rank": 0}


@pytest.mark.parametrize("msg,field", [
    ({**ASK, "t": "ic_put", "key": "", "value": "v"}, "key"),
    ({**ASK, "t": "ic_get", "rank": -1, "key": "k"}, "rank"),
    ({**ASK, "t": "ic_get", "run": 0, "key": "k"}, "run"),
    ({**ASK, "t": "ic_fence", "epoch": 0}, "epoch"),
    ({**ASK, "t": "ic_send", "command": "c", "ranks": [1, -2]}, "ranks[1]"),
    ({"v": VERSION, "id": "x", "t": "ic_delivered", "node": "n1", "ref": "r", "count": -1}, "count"),
    ({"v": VERSION, "id": "x", "t": "ic_delivered", "node": "n1", "ref": "r", "count": 0, "refused": [0] * 4097},
     "refused"),
    ({"v": VERSION, "id": "x", "t": "ic_answer", "ref": "r", "code": "kaput"}, "code"),
])
def test_an_intercom_message_that_does_not_fit_is_refused_naming_the_field(msg, field):
    with pytest.raises(ProtocolError, match=f"field '{re.escape(field)}'"):
        decode(msgpack.packb(msg))


def test_an_intercom_answer_travels_with_its_error_code():
    from cm.protocol import IntercomAnswer

    back = decode(encode(IntercomAnswer(ref="r", code=ErrorCode.LIMIT, error="too big")))
    assert back.code is ErrorCode.LIMIT and not back.absent
    assert decode(encode(IntercomAnswer(ref="r", absent=True))).code is None


def test_every_error_the_intercom_library_tells_apart_is_an_error_code():
    from cm import intercom

    assert set(intercom.ERRORS) == {ErrorCode.TIMEOUT.value, ErrorCode.LIMIT.value, ErrorCode.ENDED.value}
    loaded = subprocess.run([sys.executable, "-c", "import sys, cm.intercom; print('cm.protocol' in sys.modules)"],
                            capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "False"  # a job's process does not pay for importing cm.protocol
