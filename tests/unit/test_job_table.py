"""The head's job state machine, driven event by event against an in-memory store."""

from __future__ import annotations

import logging
import time

import pytest

from cm.head.outcome import Outcome
from cm.protocol import CommandShare, SyncDestination, SyncSource
from cm.states import JobState
from cm.transfer.exitcodes import TRANSIENT

from .memory_store import command_fields, sync_fields

ADDRS = {"n1": "h1:7001", "n2": "h2:7002", "n3": "h3:7003", "n4": "h4:7004"}


def submit(table, **over) -> int:
    return table.submit(command_fields(**over))["_id"]


def dispatch(table, job_id: int, *nodes: list[str]) -> Outcome:
    out = Outcome()
    table.dispatch(job_id, list(nodes), ADDRS, out)
    return out


def running(table, job_id: int, node: str = "n1") -> None:
    """Dispatched on node, started there, and the held RUNNING write made."""
    dispatch(table, job_id, [node])
    table.started(job_id, node, 1, ADDRS, Outcome(), "run", 0)
    table.flush()


def stored(store, job_id: int) -> dict:
    return store.docs[job_id]


def test_a_command_job_goes_from_pending_to_completed_and_leaves_memory(table, store):
    job_id = submit(table)
    assert stored(store, job_id)["state"] == "PENDING" and [r.job_id for r in table.pending()] == [job_id]
    out = dispatch(table, job_id, ["n1"])
    [(node, sent_id, spec)] = out.run
    assert (node, sent_id) == ("n1", job_id) and isinstance(spec, CommandShare)
    assert (spec.run, spec.rank, spec.argv, spec.uid, spec.nodelist) == (1, 0, ["true"], 1000, ["n1"])
    assert stored(store, job_id)["state"] == "DISPATCHING" and table.pending() == []
    table.started(job_id, "n1", 1, ADDRS, Outcome(), "run", 0)
    table.flush()
    assert stored(store, job_id)["state"] == "RUNNING" and stored(store, job_id)["slots"][0]["started"]
    out = Outcome()
    table.ended(job_id, "n1", 1, JobState.COMPLETED, 0, "", out, "run", 0)
    assert out.finished == [job_id] and stored(store, job_id)["state"] == "COMPLETED"
    assert stored(store, job_id)["exit_code"] == 0 and job_id not in table.jobs
    assert [j["_id"] for j in table.shown()] == [job_id]  # recently finished: cminfo still lists it


def test_a_failing_share_fails_the_job_with_its_exit_code(table, store):
    job_id = submit(table)
    running(table, job_id)
    table.ended(job_id, "n1", 1, JobState.FAILED, 3, "", Outcome(), "run", 0)
    assert (stored(store, job_id)["state"], stored(store, job_id)["exit_code"]) == ("FAILED", 3)


def test_running_is_written_behind_so_a_job_that_ends_at_once_costs_one_write(table, store):
    job_id = submit(table)
    dispatch(table, job_id, ["n1"])
    before = len(store.writes)
    table.started(job_id, "n1", 1, ADDRS, Outcome(), "run", 0)
    assert table.unsaved(job_id) and stored(store, job_id)["state"] == "DISPATCHING"  # held, not written
    assert table.jobs[job_id]["started"] and len(store.writes) == before
    assert table.next_flush(0.05) is not None
    table.ended(job_id, "n1", 1, JobState.COMPLETED, 0, "", Outcome(), "run", 0)
    [(kind, _, fields)] = store.writes[before:]
    assert kind == "transition" and fields["state"] == "COMPLETED" and fields["started"]
    assert fields["slots.0.started"] and not table.unsaved(job_id)


def test_a_held_running_write_is_made_once_it_is_due(table, store):
    job_id = submit(table)
    dispatch(table, job_id, ["n1"])
    table.started(job_id, "n1", 1, ADDRS, Outcome(), "run", 0)
    table.flush(older_than=3600)
    assert stored(store, job_id)["state"] == "DISPATCHING"
    table.flush(older_than=0)
    assert stored(store, job_id)["state"] == "RUNNING" and not table.unsaved(job_id)


def test_a_requeue_job_on_a_lost_node_waits_again_with_the_reason(table, store, up):
    job_id = submit(table, requeue=True)
    running(table, job_id)
    up.discard("n1")
    out = Outcome()
    table.node_lost("n1", "node n1 stopped answering", out, {"cpu": 3})
    doc = stored(store, job_id)
    assert doc["state"] == "PENDING" and doc["slots"] == [] and doc["reason"] == "requeued: node n1 stopped answering"
    assert out.kill == [] and [r.job_id for r in table.pending()] == [job_id]
    out = dispatch(table, job_id, ["n2"])
    assert out.run[0][2].run == 2  # the second run


def test_a_job_without_requeue_on_a_lost_node_ends_node_fail(table, store, up):
    job_id = submit(table, nodes=2)
    dispatch(table, job_id, ["n1", "n2"])
    for node, rank in (("n1", 0), ("n2", 1)):
        table.started(job_id, node, 1, ADDRS, Outcome(), "run", rank)
    table.flush()
    up.discard("n1")
    out = Outcome()
    table.node_lost("n1", "gone", out, {})
    assert [(s.node, s.state) for s in out.kill] == [("n2", "NODE_FAIL")]  # the rest of the job is stopped
    assert stored(store, job_id)["state"] == "RUNNING"
    table.ended(job_id, "n2", 1, JobState.NODE_FAIL, -1, "", out, "run", 1)
    assert stored(store, job_id)["state"] == "NODE_FAIL"


def sync_running(table, store) -> int:
    job_id = table.submit(sync_fields())["_id"]
    out = dispatch(table, job_id, ["n1"], ["n2"])
    assert [(n, type(s)) for n, _, s in out.run] == [("n2", SyncDestination)]  # receivers first
    out = Outcome()
    table.started(job_id, "n2", 1, ADDRS, out, "dst", 0)
    [(node, _, spec)] = out.run
    assert node == "n1" and isinstance(spec, SyncSource)
    assert (spec.transfer.dst_host, spec.transfer.dst_port, spec.transfer.transport) == ("h2", 7002, "tcp")
    table.started(job_id, "n1", 1, ADDRS, Outcome(), "src", 0)
    table.flush()
    assert stored(store, job_id)["state"] == "RUNNING"
    return job_id


def test_a_sync_whose_sender_lost_its_receiver_starts_again(table, store):
    job_id = sync_running(table, store)
    out = Outcome()
    table.ended(job_id, "n1", 1, JobState.FAILED, TRANSIENT, "receiver went away", out, "src", 0)
    doc = stored(store, job_id)
    assert doc["state"] == "PENDING" and doc["restarts"] == 1 and doc["reason"].startswith("restarting: n1")
    assert [(s.node, s.role) for s in out.kill] == [("n2", "dst")]  # the receiver of that run is released


def test_a_sync_restarts_on_as_many_nodes_as_remain(table, store, up):
    job_id = table.submit(sync_fields(nodes=2))["_id"]
    dispatch(table, job_id, ["n1", "n3"], ["n2", "n4"])
    up.discard("n3")
    table.node_lost("n3", "gone", Outcome(), {"cpu": 1, "gpu": 2})
    doc = stored(store, job_id)
    assert doc["state"] == "PENDING" and doc["nodes"] == 1 and doc["restarts"] == 1


def test_a_sync_gives_up_restarting_after_five_restarts(table, store):
    job_id = sync_running(table, store)
    table.jobs[job_id]["restarts"] = store.docs[job_id]["restarts"] = 5
    table.ended(job_id, "n1", 1, JobState.FAILED, TRANSIENT, "receiver went away", Outcome(), "src", 0)
    assert stored(store, job_id)["state"] == "FAILED" and stored(store, job_id)["exit_code"] == TRANSIENT


def test_the_transport_asked_for_reaches_the_senders_spec(table):
    job_id = table.submit(sync_fields(sync={**sync_fields()["sync"], "transport": "rdma"}))["_id"]
    dispatch(table, job_id, ["n1"], ["n2"])
    out = Outcome()
    table.started(job_id, "n2", 1, ADDRS, out, "dst", 0)
    assert out.run[0][2].transfer.transport == "rdma"


@pytest.mark.parametrize("state", ["PENDING", "HELD"])
def test_cancelling_a_waiting_job_ends_it_at_once(table, store, state):
    job_id = submit(table, state=state)
    out = Outcome()
    assert table.cancel(job_id, out) == "cancelled"
    assert out.finished == [job_id] and out.kill == [] and stored(store, job_id)["state"] == "CANCELLED"
    assert table.pending() == []


@pytest.mark.parametrize("started", [False, True], ids=["dispatching", "running"])
def test_cancelling_a_dispatched_job_stops_its_share_then_ends_cancelled(table, store, started):
    job_id = submit(table)
    dispatch(table, job_id, ["n1"])
    if started:
        table.started(job_id, "n1", 1, ADDRS, Outcome(), "run", 0)
        table.flush()
    out = Outcome()
    assert table.cancel(job_id, out) == "cancelling"
    assert [(s.node, s.job_id, s.state, s.run) for s in out.kill] == [("n1", job_id, "CANCELLED", 1)]
    assert stored(store, job_id)["cancel_requested"] and table.stopping(job_id)
    again = Outcome()
    assert table.cancel(job_id, again) == "cancelling"  # a second cmkill changes nothing stored
    table.ended(job_id, "n1", 1, JobState.CANCELLED, 143, "", again, "run", 0)
    assert stored(store, job_id)["state"] == "CANCELLED" and again.finished == [job_id]


def test_cancelling_a_job_whose_node_is_down_ends_it_at_once(table, store, up):
    job_id = submit(table)
    running(table, job_id)
    up.discard("n1")
    out = Outcome()
    assert table.cancel(job_id, out) == "cancelled"
    assert out.kill == [] and stored(store, job_id)["state"] == "CANCELLED"
    assert stored(store, job_id)["slots"][0]["exit_code"] == -1


def test_a_stop_no_node_confirms_releases_the_slot_and_drains_the_node(table, store):
    job_id = submit(table)
    running(table, job_id)
    table.cancel(job_id, Outcome())
    out = Outcome()
    table.expire_stops(time.monotonic() + 1, out)
    assert out.drain == [] and stored(store, job_id)["state"] == "RUNNING"  # not yet
    table.expire_stops(time.monotonic() + table.stop_timeout + 1, out)
    assert out.drain == [("n1", "kill not confirmed")]
    doc = stored(store, job_id)
    assert doc["state"] == "CANCELLED" and doc["reason"].startswith("kill not confirmed by n1")


def test_a_job_past_its_time_limit_is_stopped_by_the_head(table, store):
    job_id = submit(table)
    running(table, job_id)
    out = Outcome()
    table.overdue(time.time() + 30, 5, out)
    assert out.kill == []
    table.overdue(time.time() + 120, 5, out)
    assert [(s.node, s.state) for s in out.kill] == [("n1", "TIMEOUT")]
    assert stored(store, job_id)["reason"] == "time limit reached; stopped by the head"
    table.ended(job_id, "n1", 1, JobState.TIMEOUT, -1, "", out, "run", 0)
    assert stored(store, job_id)["state"] == "TIMEOUT"


def test_a_started_share_the_node_no_longer_runs_is_lost(table, store):
    job_id = submit(table)
    running(table, job_id)
    out = Outcome()
    table.check_node("n1", {(job_id, 1, "run", 0)}, set(), None, out, lambda: {"cpu": 4})
    assert stored(store, job_id)["state"] == "RUNNING"
    table.check_node("n1", set(), set(), None, out, lambda: {"cpu": 4})
    doc = stored(store, job_id)
    assert doc["state"] == "NODE_FAIL" and "n1 is not running its share" in doc["reason"]


# --- lost races: another writer moved the job first ---------------------------


def test_a_cancel_that_loses_to_another_writer_reloads_the_job_and_says_so(table, store, caplog):
    job_id = submit(table)
    running(table, job_id)
    store.docs[job_id]["state"] = "COMPLETED"  # another writer ended it meanwhile
    out = Outcome()
    with caplog.at_level(logging.WARNING, logger="cm.head.jobs"):
        assert table.cancel(job_id, out) == "not cancelled: it is COMPLETED"
    assert out.kill == [] and out.finished == [] and job_id not in table.jobs
    assert table.lost_races == 1 and "lost a race" in caplog.text
    assert "cancel_requested" not in table.find(job_id) or not table.find(job_id)["cancel_requested"]


def test_a_cancel_that_loses_to_a_requeue_cancels_what_was_stored(table, store):
    job_id = submit(table)
    running(table, job_id)
    store.docs[job_id].update(state="PENDING", slots=[])  # another writer requeued it
    out = Outcome()
    assert table.cancel(job_id, out) == "cancelled"
    assert table.lost_races == 1 and stored(store, job_id)["state"] == "CANCELLED" and out.kill == []


def test_an_end_that_loses_leaves_memory_as_stored(table, store):
    job_id = submit(table, nodes=2)
    dispatch(table, job_id, ["n1", "n2"])
    for node, rank in (("n1", 0), ("n2", 1)):
        table.started(job_id, node, 1, ADDRS, Outcome(), "run", rank)
    table.flush()
    store.docs[job_id]["state"] = "HELD"  # impossible for the head, possible for another writer
    out = Outcome()
    table.ended(job_id, "n1", 1, JobState.COMPLETED, 0, "", out, "run", 0)
    assert table.lost_races == 1 and out.finished == [] and out.kill == []
    assert table.jobs[job_id]["state"] == "HELD" and table.jobs[job_id] == table.store.get_job(job_id)
    assert table.why_waiting(job_id) == "Held"


def test_a_dispatch_that_loses_sends_nothing(table, store):
    job_id = submit(table)
    store.docs[job_id]["state"] = "HELD"
    out = dispatch(table, job_id, ["n1"])
    assert out.run == [] and table.jobs[job_id]["state"] == "HELD" and table.pending() == []


def test_a_timeout_that_loses_stops_nothing(table, store):
    job_id = submit(table)
    running(table, job_id)
    store.docs[job_id]["state"] = "CANCELLED"
    out = Outcome()
    table.overdue(time.time() + 120, 5, out)
    assert out.kill == [] and job_id not in table.jobs and not table.stopping(job_id)


def test_a_restart_after_load_resends_what_each_job_waits_for(table, store):
    job_id = submit(table)
    running(table, job_id)
    cancelled = submit(table)
    running(table, cancelled, "n2")
    table.cancel(cancelled, Outcome())
    table.load()  # a head restart
    out = Outcome()
    table.resend(ADDRS, out)
    assert [(n, j) for n, j, _ in out.run] == [("n1", job_id)]
    assert [(s.node, s.job_id, s.state) for s in out.kill] == [("n2", cancelled, "CANCELLED")]


def test_a_job_record_in_memory_holds_only_stored_fields_and_equals_what_is_stored(table, store):
    from cm.head.progress import report_of
    from cm.head.records import Job
    from cm.protocol import Progress, SyncCounters

    job_id = sync_running(table, store)
    counters = SyncCounters(bytes_done=5, bytes_total=10, files_done=1, files_total=2, rate=1.0)
    table.progress(job_id, "n1/0", 1, report_of(Progress(job_id=job_id, node="n1", run=1, counters=counters)))
    job = table.jobs[job_id]
    assert set(job) <= set(Job.__annotations__)
    assert {k: v for k, v in job.items() if k != "progress"} == {
        k: v for k, v in store.get_job(job_id).items() if k != "progress"}  # progress: stored when it ends
    assert job["progress"]["bytes_done"] == 5


def test_a_repeated_idempotency_key_finds_the_users_first_job_in_memory_and_in_the_store(table, store):
    first = submit(table, idempotency_key="k1", labels={"workflow": "w1"})
    assert table.submitted_with(1000, "k1") == first and stored(store, first)["labels"] == {"workflow": "w1"}
    assert table.submitted_with(1001, "k1") is None  # another user's key is not hers
    assert table.submitted_with(1000, "k2") is None
    table.jobs.clear()  # a head that restarted long after: only the store knows
    assert table.submitted_with(1000, "k1") == first


def test_delete_removes_a_finished_job_everywhere_and_leaves_an_active_one(table, store):
    done, active = submit(table), submit(table)
    running(table, done)
    table.ended(done, "n1", 1, JobState.COMPLETED, 0, "", Outcome(), "run", 0)
    assert [j["_id"] for j in table.shown()] == [done, active]
    table.delete(active)
    table.delete(done)
    assert done not in store.docs and table.find(done) is None and [j["_id"] for j in table.shown()] == [active]
    assert stored(store, active)["state"] == "PENDING" and table.find(active) is not None
