"""The head as a state machine: events in, instructions out (cm.head.state), no socket, clock or database server.

A bug report becomes a list of events. The last test replays what a real head handled during a run of the
model-based test (tests/test_model.py, recorded with CM_HEAD_EVENTS) and checks that the state gives, event
by event, the instructions the real head gave.
"""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest

from cm.config import load
from cm.callers import Caller
from cm.head.events import (Answer, ClientAsked, Command, DbBack, DbLost, Delivered, Flush, NodeSaid, Pass, Resend,
                            Send, Tick)
from cm.head.jobs import JobTable
from cm.head.policies import get_policy
from cm.head.record import Open, event_of, summary
from cm.head.registry import Registry
from cm.head.rules import Clock
from cm.head.scheduler import Scheduler
from cm.head.state import HeadState
from cm.protocol import Ack, Error, Heartbeat, Hello, JobEnded, JobStarted, KillJob, RunJob, ShareKey, Stats, Welcome

from .memory_store import MemoryStore, command_fields

ROOT = Caller(0, 0, 1, "root", True)


class MemoryDb:
    """Nodes and the admin policy, in memory (cm.store's functions of the same names)."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}
        self.policy: dict = {}

    def all_nodes(self) -> list[dict]:
        return list(self.nodes.values())

    def save_node(self, name: str, **fields) -> None:
        self.nodes.setdefault(name, {"_id": name}).update(fields)

    def get_policy(self) -> dict:
        return dict(self.policy)

    def set_policy(self, **change) -> None:
        self.policy.update(change)


class Head:
    """A HeadState and a clock the test moves (every event carries its time)."""

    def __init__(self) -> None:
        self.settings = load(env={}, heartbeat_interval=1.0, heartbeat_timeout=3.0, kill_grace=1.0, kill_confirm=2.0)
        self.store = MemoryStore()
        self.t = 1000.0
        jobs = JobTable(self.store, stop_timeout=3.0, clock=Clock(self.t, 1.7e9))
        self.state = HeadState(self.settings, jobs, Registry(3.0, db=MemoryDb(), started=self.t),
                               Scheduler(get_policy("first-fit"), True), db=MemoryDb(), perf=lambda: self.t)
        self.state.open(self.t, 1.7e9)
        self.ids = itertools.count(1)

    def at(self, seconds: float) -> tuple[float, float]:
        self.t += seconds
        return self.t, 1.7e9 + self.t

    def node(self, name: str, msg, after: float = 0.0) -> list:
        return self.state.handle(NodeSaid(*self.at(after), name, msg))

    def hello(self, name: str, incarnation: str = "a") -> list:
        return self.node(name, Hello(node=name, partition="cpu", cpus=4, mem_mb=4000, version="t", running=[],
                                     transfer_addr=f"{name}:7000", data_root="/data", incarnation=incarnation))

    def beat(self, name: str, shares=(), after: float = 0.0) -> list:
        shares = [tuple(s) for s in shares]
        return self.node(name, Heartbeat(node=name, running=sorted({s[0] for s in shares}), shares=[ShareKey(*s) for s in shares]),
                         after)

    def submit(self, **over) -> int:
        return self.state.jobs.submit(command_fields(**over))["_id"]

    def tick(self, after: float = 0.0) -> list:
        return self.state.handle(Tick(*self.at(after)))

    def schedule(self) -> list:
        return self.state.handle(Pass(*self.at(0)))

    def job(self, job_id: int) -> dict:
        return self.store.docs[job_id]


def commands(out: list, kind: type) -> list:
    return [(c.node, c.msg) for c in out if isinstance(c, Command) and isinstance(c.msg, kind)]


@pytest.fixture
def head() -> Head:
    return Head()


def test_a_hello_is_welcomed_and_the_node_resent_what_it_missed(head):
    out = head.hello("n1")
    assert [type(i.msg) for i in out if isinstance(i, Send)] == [Welcome]
    assert Resend("n1") in out and head.state.registry.nodes["n1"].alive


def test_a_heartbeat_from_an_unknown_node_asks_it_to_say_hello(head):
    [send] = head.beat("n9")
    assert isinstance(send, Send) and isinstance(send.msg, Error) and "say hello" in send.msg.message


def test_a_job_runs_start_to_end_by_events(head):
    head.hello("n1")
    job_id = head.submit()
    out = head.schedule()
    [(node, run)] = commands(out, RunJob)
    assert node == "n1" and run.job_id == job_id and head.job(job_id)["state"] == "DISPATCHING"
    started = JobStarted(node="n1", job_id=job_id, run=1, role="run", rank=0)
    out = head.node("n1", started)
    assert not [i for i in out if isinstance(i, Send)]  # acknowledged once the start is written
    out = head.state.handle(Flush(*head.at(0.1), 0.05))
    assert [(i.node, i.msg.ref) for i in out] == [("n1", started.id)] and head.job(job_id)["state"] == "RUNNING"
    ended = JobEnded(node="n1", job_id=job_id, run=1, state="COMPLETED", exit_code=0, role="run", rank=0)
    out = head.node("n1", ended)
    assert [(i.node, i.msg.ref) for i in out if isinstance(i, Send)] == [("n1", ended.id)]
    assert head.job(job_id)["state"] == "COMPLETED"
    assert head.node("n1", Ack(ref=run.id)) == [Delivered(run.id)]


def test_a_node_that_stops_answering_fails_its_jobs(head):
    head.hello("n1")
    job_id = head.submit()
    head.schedule()
    head.node("n1", JobStarted(node="n1", job_id=job_id, run=1, role="run", rank=0))
    head.tick(after=4.0)
    assert head.job(job_id)["state"] == "NODE_FAIL" and "stopped answering" in head.job(job_id)["reason"]


def test_while_the_database_is_away_requests_wait_and_node_reports_are_left_for_later(head):
    head.hello("n1")
    head.state.handle(DbLost(*head.at(0), "a test", "gone"))
    assert not head.state.up
    info = Stats()
    [answer] = head.state.handle(ClientAsked(*head.at(0), ROOT, info, "to"))
    assert isinstance(answer, Answer) and answer.reply.code.name == "DB_UNAVAILABLE"
    assert head.node("n1", JobEnded(node="n1", job_id=1, run=1, state="COMPLETED", exit_code=0)) == []
    assert head.tick(after=10.0) == [] and head.schedule() == []
    head.state.handle(DbBack(*head.at(0)))
    assert head.state.up
    [answer] = head.state.handle(ClientAsked(*head.at(0), ROOT, info, "to"))
    assert answer.reply.ok


def test_a_dispatch_the_node_never_confirms_ends_the_job(head):
    """A model-test scenario written as events: `cmrun -n 1 --partition cpu sleep 1` on a node whose daemon is frozen
    (freeze_node) right after the dispatch: it still heartbeats (its socket thread), names no share, never
    starts it. The chaos test saw such a job stay DISPATCHING for ever."""
    head.hello("n1")
    job_id = head.submit(argv=["sleep", "1"])
    [(_, run)] = commands(head.schedule(), RunJob)
    for _ in range(5):
        head.beat("n1", after=1.0)
        assert head.job(job_id)["state"] == "DISPATCHING"
    for _ in range(5):
        head.beat("n1", after=1.0)
    doc = head.job(job_id)
    assert doc["state"] == "NODE_FAIL" and "did not start within" in doc["reason"]
    assert head.state.still_wanted("n1", run) is False  # its RunJob is not sent again


def test_a_requeued_job_on_a_restarted_daemon_runs_again(head):
    """A model-test scenario written as events: `cmrun --requeue` running on n1; kill_node n1, start_node n1 (a new
    incarnation says hello): the job waits again and the next pass sends it out again, run 2."""
    head.hello("n1")
    head.hello("n2")
    job_id = head.submit(requeue=True, argv=["sleep", "5"])
    [(node, _)] = commands(head.schedule(), RunJob)
    head.node(node, JobStarted(node=node, job_id=job_id, run=1, role="run", rank=0))
    head.beat(node, [(job_id, 1, "run", 0)], after=0.5)
    out = head.hello(node, incarnation="b")
    assert head.job(job_id)["state"] == "PENDING" and head.job(job_id)["reason"].startswith("requeued")
    [(again, run)] = commands(head.schedule(), RunJob)
    assert run.spec.run == 2 and head.job(job_id)["state"] == "DISPATCHING"
    ended = JobEnded(node=again, job_id=job_id, run=1, state="FAILED", exit_code=9, role="run", rank=0)
    head.node(again, ended)  # a late report of the first run changes nothing
    assert head.job(job_id)["state"] == "DISPATCHING"
    assert not commands(out, KillJob) or all(k.job_id == job_id for _, k in commands(out, KillJob))


RECORDED = Path(__file__).with_name("data") / "model_seed3.jsonl.gz"


def test_a_recorded_model_run_replays_to_the_same_instructions():
    """tests/test_model.py, seed 3, its first 18 operations but head restarts (submits of command and sync
    jobs, cancels, a hold, a node frozen and thawed), as the real head handled them: every event gives the
    instructions it gave there (kinds, nodes, messages, jobs and states; message ids are new on every run)."""
    lines = gzip.open(RECORDED, "rt", encoding="utf-8").read().splitlines()
    opened, recorded = event_of(lines[0])
    assert isinstance(opened, Open)
    settings = load(env={}, **json.loads(lines[0])["settings"])
    store = MemoryStore()
    jobs = JobTable(store, stop_timeout=settings.kill_grace + settings.kill_confirm,
                    clock=Clock(opened.mono, opened.wall))
    state = HeadState(settings, jobs, Registry(settings.heartbeat_timeout, db=MemoryDb()),
                      Scheduler(get_policy(settings.policy), settings.backfill), db=MemoryDb())
    assert summary(state.open(opened.mono, opened.wall)) == recorded
    handled = 0
    for number, line in enumerate(lines[1:], 2):
        ev, recorded = event_of(line)
        if isinstance(ev, Open):
            break  # the head restarted: what it loaded was the real database's
        assert summary(state.handle(ev)) == recorded, f"line {number}: {line[:300]}"
        handled += 1
    assert handled == len(lines) - 1
    assert {job_id: doc["state"] for job_id, doc in store.docs.items()} == {
        1: "CANCELLED", 2: "COMPLETED", 3: "COMPLETED", 4: "CANCELLED", 5: "CANCELLED", 6: "CANCELLED"}
