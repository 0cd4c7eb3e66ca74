"""The sender refuses a bad spec with a clear message; RDMA says what is missing."""

import subprocess
import sys

import pytest

from cm.transfer import exitcodes, rdma
from cm.transfer.spec import SpareJob, Spec, SpecError

from .conftest import sender_env

GOOD = {"transfer_id": "t", "token": "k", "src_root": "/tmp", "src_path": "/", "dst_host": "127.0.0.1",
        "dst_port": 1234}


@pytest.mark.parametrize("change, word", [
    ({"rank": 2, "nranks": 2}, "rank"),
    ({"policy": "random"}, "policy"),
    ({"chunk_size": 1000}, "chunk_size"),
    ({"bwlimit": -5}, "bwlimit"),
    ({"exclude": "*.tmp"}, "exclude"),
    ({"streams": True}, "streams"),
    ({"surprise": 1}, "surprise"),
    ({"dst_port": 70000}, "dst_port"),
    ({"exclude": ["ok", ""]}, "exclude"),
    ({"exclude": ["//"]}, "exclude pattern"),
])
def test_bad_specs_name_the_bad_field(change, word):
    with pytest.raises(SpecError, match=word):
        Spec.from_dict({**GOOD, **change})


def test_a_missing_field_is_named():
    with pytest.raises(SpecError, match="token"):
        Spec.from_dict({k: v for k, v in GOOD.items() if k != "token"})


def test_a_spec_decodes_from_json_as_from_a_dict():
    import json

    spec = Spec.from_json(json.dumps({**GOOD, "exclude": ["*.tmp"], "bwlimit": 1000}))
    assert spec == Spec.from_dict({**GOOD, "exclude": ["*.tmp"], "bwlimit": 1000})
    assert spec.exclude == ("*.tmp",) and spec.streams == 4


def test_a_spare_job_may_leave_its_error_log_out():
    for raw in (b'{"transfer": {"a": 1}, "uid": 0, "gid": 0, "groups": [], "stderr": null}',
                b'{"transfer": {"a": 1}, "uid": 0, "gid": 0, "groups": []}'):
        job = SpareJob.from_json(raw)
        assert not job.stderr and bytes(job.transfer) == b'{"a": 1}'


@pytest.mark.parametrize("raw, word", [
    (b'{"transfer": {}, "uid": true, "gid": 0, "groups": []}', "uid"),
    (b'{"transfer": {}, "uid": 0, "gid": 0, "groups": ["wheel"]}', "groups[0]"),
    (b'{"transfer": {}, "uid": 0, "gid": 0}', "groups"),
    (b'{"transfer": {}, "uid": 0, "gid": 0, "groups": [], "shell": "/bin/sh"}', "shell"),
])
def test_a_bad_spare_job_is_refused_naming_the_field(raw, word):
    with pytest.raises(SpecError) as refused:
        SpareJob.from_json(raw)
    assert word in str(refused.value)


def test_the_sender_exits_2_on_a_bad_spec_with_one_line():
    for stdin in ("not json", '{"transfer_id": 5}'):
        out = subprocess.run([sys.executable, "-m", "cm.transfer.send"], input=stdin, capture_output=True,
                             text=True, env=sender_env(), timeout=30)
        assert out.returncode == exitcodes.BAD_SPEC == 2
        assert len(out.stderr.strip().splitlines()) == 1
        assert "transfer_id" in out.stderr or "not JSON" in out.stderr


def test_a_spare_exits_2_on_a_bad_job_with_one_line():
    out = subprocess.run([sys.executable, "-m", "cm.transfer.send", "--spare"], input='{"transfer": {}, "uid": -1}',
                         capture_output=True, text=True, env=sender_env(), timeout=60)
    assert out.returncode == exitcodes.BAD_SPEC
    assert "uid" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_the_head_restarts_a_sync_on_the_senders_own_transient_code():
    from cm.head import endings

    assert endings.TRANSIENT_EXIT is exitcodes.TRANSIENT == 75


def test_rdma_reports_what_is_missing():
    message = rdma.missing()
    assert message is None or ("pyverbs" in message or "RDMA" in message)
