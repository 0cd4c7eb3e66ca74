"""The sender refuses a bad spec with a clear message; RDMA says what is missing."""

import subprocess
import sys

import pytest

from cm.transfer import rdma
from cm.transfer.spec import Spec, SpecError

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
])
def test_bad_specs_name_the_bad_field(change, word):
    with pytest.raises(SpecError, match=word):
        Spec.from_dict({**GOOD, **change})


def test_a_missing_field_is_named():
    with pytest.raises(SpecError, match="token"):
        Spec.from_dict({k: v for k, v in GOOD.items() if k != "token"})


def test_the_sender_exits_2_on_a_bad_spec_with_one_line():
    for stdin in ("not json", '{"transfer_id": 5}'):
        out = subprocess.run([sys.executable, "-m", "cm.transfer.send"], input=stdin, capture_output=True,
                             text=True, env=sender_env(), timeout=30)
        assert out.returncode == 2
        assert len(out.stderr.strip().splitlines()) == 1


def test_rdma_reports_what_is_missing():
    message = rdma.missing()
    assert message is None or ("pyverbs" in message or "RDMA" in message)
