"""cm.outbox.Outbox: what the head's commands and a node's reports wait in until they are acknowledged."""

from __future__ import annotations

from cm.outbox import Outbox
from cm.protocol import JobEnded, KillJob


def test_a_message_is_due_again_each_retry_until_it_is_acknowledged():
    box = Outbox(retry=2.0)
    kill = KillJob(job_id=1, state="CANCELLED")
    box.put("n1", kill, now=10.0)
    assert box.due(11.9) == [] and box.due(12.0) == [(kill.id, "n1", kill)]
    box.sent(kill.id, 12.0)
    assert box.due(13.0) == [] and len(box) == 1
    assert box.ack(kill.id) is kill and box.due(100.0) == [] and len(box) == 0
    assert box.ack(kill.id) is None  # a repeated ack changes nothing


def test_messages_are_found_by_peer_and_dropped_by_what_they_say():
    box = Outbox(retry=2.0)
    a, b = JobEnded(node="n1", job_id=1, run=1, state="COMPLETED", exit_code=0), KillJob(job_id=2, state="TIMEOUT")
    box.put("", a, 0.0)
    box.put("n2", b, 0.0)
    assert box.to("n2") == [(b.id, b)] and list(box.messages()) == [a, b]
    box.drop(lambda to, msg: isinstance(msg, KillJob) and msg.job_id == 2)
    assert list(box.messages()) == [a]
