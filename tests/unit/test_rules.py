"""Each rule of how a job ends, case by case (cm.head.rules), and the DISPATCHING job nobody confirmed.

Where the three old copies of "restart this sync?" disagreed, the rule is now: a sync restarts unless it is
being cancelled, is being stopped (a forced end is under way), or has restarted SYNC_RESTARTS times, whether
its sender lost its receiver, a share was lost or its node was. A forced end is the first of FORCED
(TIMEOUT, NODE_FAIL, CANCELLED) everywhere, a cancel asked for before all.
"""

from __future__ import annotations

import time

import pytest

from cm.head.outcome import Outcome
from cm.head.rules import SYNC_RESTARTS, forced_end, may_requeue, may_restart
from cm.states import JobState
from cm.transfer.exitcodes import TRANSIENT

from .memory_store import command_fields, sync_fields
from .test_job_table import ADDRS, dispatch, stored, submit, sync_running

ALIVE = {"cpu": 4, "gpu": 4}


def later(monkeypatch, seconds: float) -> None:
    """The head's monotonic clock, this many seconds on (a table made without a clock reads the system's)."""
    now = time.monotonic() + seconds
    monkeypatch.setattr(time, "monotonic", lambda: now)


# --- restart a sync? -------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "stopping", "restart"), [
    ({}, False, True),
    ({"restarts": SYNC_RESTARTS - 1}, False, True),
    ({"restarts": SYNC_RESTARTS}, False, False),
    ({"cancel_requested": True}, False, False),
    ({}, True, False),
])
def test_a_sync_restarts_unless_cancelled_stopping_or_at_the_cap(fields, stopping, restart):
    assert may_restart({**sync_fields(), **fields}, stopping) is restart
    assert may_restart(command_fields(**fields), stopping) is False


@pytest.mark.parametrize(("fields", "stopping", "requeue"), [
    ({"requeue": True}, False, True),
    ({"requeue": True, "restarts": SYNC_RESTARTS}, False, True),  # the cap is a sync's, not a requeue's
    ({"requeue": False}, False, False),
    ({"requeue": True, "cancel_requested": True}, False, False),
    ({"requeue": True}, True, False),
])
def test_a_requeue_job_waits_again_unless_cancelled_or_stopping(fields, stopping, requeue):
    assert may_requeue(command_fields(**fields), stopping) is requeue


def test_a_sync_whose_node_is_lost_at_the_cap_ends_node_fail(table, store, up):
    """node_lost used to restart a sync without the cap: a sync on a flapping node restarted for ever."""
    job_id = sync_running(table, store)
    table.jobs[job_id]["restarts"] = store.docs[job_id]["restarts"] = SYNC_RESTARTS
    up.discard("n1")
    table.node_lost("n1", "node n1 stopped answering", Outcome(), ALIVE)
    doc = stored(store, job_id)
    assert doc["state"] == "NODE_FAIL" and doc["restarts"] == SYNC_RESTARTS


def test_a_sync_whose_node_is_lost_below_the_cap_restarts(table, store, up):
    job_id = sync_running(table, store)
    up.discard("n1")
    table.node_lost("n1", "node n1 stopped answering", Outcome(), ALIVE)
    assert (stored(store, job_id)["state"], stored(store, job_id)["restarts"]) == ("PENDING", 1)


def test_a_sync_being_stopped_whose_share_is_lost_does_not_restart(table, store):
    """share_lost used to restart a sync that was being stopped (past its time limit here)."""
    job_id = sync_running(table, store)
    out = Outcome()
    table.overdue(time.time() + 3600, 5, out)
    assert out.kill and stored(store, job_id)["state"] == "RUNNING"  # told to stop, waiting for it
    table.share_lost(table.jobs[job_id], [0], "n1 is not running its share", Outcome(), ALIVE)
    assert stored(store, job_id)["state"] != "PENDING"


def test_a_sync_whose_sender_lost_its_receiver_while_cancelled_ends_cancelled(table, store):
    job_id = sync_running(table, store)
    table.cancel(job_id, Outcome())
    table.ended(job_id, "n1", 1, JobState.FAILED, TRANSIENT, "receiver went away", Outcome(), "src", 0)
    assert stored(store, job_id)["state"] == "CANCELLED"


# --- which forced end wins --------------------------------------------------------------------------


def slots(*states: str) -> list[dict]:
    return [{"node": f"n{i + 1}", "rank": i, "role": "run", "cpus": 1, "mem_mb": 0, "started": True,
             "ended": bool(s), "state": s, "exit_code": -1 if s else 0} for i, s in enumerate(states)]


@pytest.mark.parametrize(("states", "cancel", "wins"), [
    (("TIMEOUT", "NODE_FAIL", ""), False, JobState.TIMEOUT),
    (("NODE_FAIL", "CANCELLED", ""), False, JobState.NODE_FAIL),
    (("CANCELLED", ""), False, JobState.CANCELLED),
    (("TIMEOUT", ""), True, JobState.CANCELLED),
    (("COMPLETED", ""), False, None),
])
def test_the_first_forced_end_wins(states, cancel, wins):
    assert forced_end({"slots": slots(*states), "cancel_requested": cancel}) == wins


def test_a_job_stopped_again_after_a_reload_ends_as_its_first_forced_end(table, store):
    """resend used to pick the forced end alphabetically (NODE_FAIL before TIMEOUT), final_state by FORCED."""
    job_id = submit(table, nodes=3)
    dispatch(table, job_id, ["n1", "n2", "n3"])
    for i in range(3):
        table.started(job_id, f"n{i + 1}", 1, ADDRS, Outcome(), "run", i)
    table.flush()
    store.docs[job_id]["slots"][:2] = slots("TIMEOUT", "NODE_FAIL")
    table.load()
    out = Outcome()
    table.resend(ADDRS, out)
    assert [(s.node, s.state) for s in out.kill] == [("n3", "TIMEOUT")]
    table.ended(job_id, "n3", 1, JobState.TIMEOUT, -1, "", Outcome(), "run", 2)
    assert stored(store, job_id)["state"] == "TIMEOUT"


# --- a DISPATCHING job whose dispatch nobody confirms ----------------------------------------------


def test_a_dispatched_job_reloaded_after_a_lost_race_times_out_if_it_never_starts(table, store, monkeypatch):
    """The chaos test's `not final after the storm: {132: 'DISPATCHING'}`: a job the table reloaded from the
    store (a write lost a race) had no time of sending, so a share that never started never timed out."""
    job_id = submit(table)
    dispatch(table, job_id, ["n1"])
    table._lost(table.jobs[job_id], "test")  # what a lost write does: the stored job is taken as it is
    assert table.jobs[job_id]["state"] == "DISPATCHING"
    out = Outcome()
    table.check_node("n1", set(), set(), None, out, lambda: ALIVE)
    assert stored(store, job_id)["state"] == "DISPATCHING"  # not yet: it may still start
    later(monkeypatch, table.start_timeout + 1)
    table.check_node("n1", set(), set(), None, out, lambda: ALIVE)
    doc = stored(store, job_id)
    assert doc["state"] == "NODE_FAIL" and "did not start within" in doc["reason"]


def test_a_dispatched_share_that_never_starts_times_out(table, store, monkeypatch):
    job_id = submit(table)
    dispatch(table, job_id, ["n1"])
    later(monkeypatch, table.start_timeout + 1)
    table.check_node("n1", set(), set(), None, Outcome(), lambda: ALIVE)
    assert stored(store, job_id)["state"] == "NODE_FAIL"


def test_a_requeue_job_whose_share_never_starts_waits_again(table, store, monkeypatch):
    job_id = submit(table, requeue=True)
    dispatch(table, job_id, ["n1"])
    later(monkeypatch, table.start_timeout + 1)
    table.check_node("n1", set(), set(), None, Outcome(), lambda: ALIVE)
    assert stored(store, job_id)["state"] == "PENDING" and stored(store, job_id)["reason"].startswith("requeued")
