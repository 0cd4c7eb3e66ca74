"""ShareKey: one share's identity, its wire form (an array of four, as before) and its wildcards."""

import msgspec
import pytest

from cm.protocol import (
    ANY_RANK, ANY_ROLE, ANY_RUN, VERSION, Heartbeat, JobEnded, JobStarted, KillJob, ProtocolError, ShareKey, decode, encode,
)

SRC0 = ShareKey(7, 2, "src", 0)
SRC1 = ShareKey(7, 2, "src", 1)
DST0 = ShareKey(7, 2, "dst", 0)
OLD = ShareKey(7, 1, "src", 0)
OTHER = ShareKey(8, 2, "src", 0)


def test_a_share_is_four_named_fields_and_an_array_on_the_wire():
    beat = decode(encode(Heartbeat(node="n", running=[7], shares=[SRC0, DST0], ending=[SRC1])))
    assert beat.shares == [SRC0, DST0] and isinstance(beat.shares[0], ShareKey)
    assert beat.shares[0].role == "src" and beat.ending[0].rank == 1
    # on the wire as the bare 4-tuples nodes sent before
    assert msgspec.msgpack.decode(encode(Heartbeat(node="n", running=[7], shares=[SRC0])))["shares"] == [
        [7, 2, "src", 0]]


def test_a_share_of_the_wrong_shape_is_refused_naming_it():
    raw = msgspec.msgpack.encode({"t": "heartbeat", "v": VERSION, "id": "x", "node": "n", "running": [],
                                  "shares": [[7, 2, 3, 0]]})
    with pytest.raises(ProtocolError, match="shares"):
        decode(raw)


@pytest.mark.parametrize("pattern, matched", [
    (ShareKey(7, ANY_RUN, ANY_ROLE, ANY_RANK), {SRC0, SRC1, DST0, OLD}),  # every share of the job
    (ShareKey(7, 2, ANY_ROLE, ANY_RANK), {SRC0, SRC1, DST0}),  # every share of one run
    (ShareKey(7, 2, ANY_ROLE, 0), {SRC0, SRC1, DST0}),  # role "": whatever the rank (JobStarted's default)
    (ShareKey(7, 2, "src", ANY_RANK), {SRC0, SRC1}),
    (ShareKey(7, ANY_RUN, "src", 0), {SRC0, OLD}),
    (SRC0, {SRC0}),  # a share names itself only
])
def test_matches_reads_the_wildcards(pattern, matched):
    assert {s for s in (SRC0, SRC1, DST0, OLD, OTHER) if pattern.matches(s)} == matched


def test_messages_name_their_share():
    assert KillJob(job_id=7, state="CANCELLED").share == ShareKey(7, ANY_RUN, ANY_ROLE, ANY_RANK)
    assert KillJob(job_id=7, state="CANCELLED", run=2, role="src", rank=1).share == SRC1
    assert JobStarted(job_id=7, node="n", run=2, role="dst", rank=0).share == DST0
    assert JobEnded(job_id=7, node="n", run=2, state="COMPLETED", exit_code=0, role="src", rank=1).share == SRC1
