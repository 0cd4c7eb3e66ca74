"""The scheduler's order, gang placement, policies and backfill, as pure logic."""

import pytest

from cm.head.policies import FirstFit, LeastLoaded, UnknownPolicy, get_policy
from cm.head.resources import Demand, NodeView, Request, Running
from cm.head.scheduler import NeverFits, Scheduler, check_feasible, place


def nodes(spec="n1:4,n2:4,n3:4,n4:4", partition="cpu"):
    out = {}
    for item in spec.split(","):
        name, cpus = item.split(":")
        out[name] = NodeView(name, partition, int(cpus), 1000)
    return out


def job(i, n=1, cpus=1, prio=0, submitted=None, limit=100.0, partition="cpu"):
    return Request(i, prio, submitted if submitted is not None else float(i), limit,
                   (Demand("run", n, cpus, 0, partition=partition),))


def started_ids(plan):
    return [r.job_id for r, _ in plan]


def test_jobs_start_in_priority_then_submit_order():
    ns = nodes("n1:1")
    plan = Scheduler(FirstFit()).plan([job(1), job(2, prio=5), job(3)], ns, [], 0.0)
    assert started_ids(plan) == [2]


def test_a_job_gets_all_its_nodes_at_once_or_waits():
    ns = nodes("n1:2,n2:2")
    ns["n2"].cpus_used = 2
    assert place(job(1, n=2), ns, FirstFit()) is None
    assert ns["n1"].cpus_used == 0  # nothing half-taken
    ns["n2"].cpus_used = 0
    assert place(job(1, n=2), ns, FirstFit()) == [["n1", "n2"]]


def test_first_fit_packs_and_least_loaded_spreads():
    ns = nodes("n1:4,n2:4")
    s = Scheduler(FirstFit())
    plan = s.plan([job(1), job(2)], ns, [], 0.0)
    assert [a for _, a in plan] == [[["n1"]], [["n1"]]]
    ns = nodes("n1:4,n2:4")
    plan = Scheduler(LeastLoaded()).plan([job(1), job(2)], ns, [], 0.0)
    assert [a for _, a in plan] == [[["n1"]], [["n2"]]]


def test_policies_are_chosen_by_name():
    assert get_policy("least-loaded").name == "least-loaded"
    with pytest.raises(UnknownPolicy):
        get_policy("random-walk")


def test_backfill_starts_a_short_job_that_ends_before_the_reservation():
    ns = nodes("n1:2,n2:2")
    ns["n1"].cpus_used = 2  # held by a job ending at t=100
    running = [Running(99, 100.0, [("n1", 2, 0)])]
    wide = job(1, n=2, cpus=2)  # needs both nodes: blocked until t=100
    short = job(2, cpus=2, limit=50.0)
    long = job(3, cpus=2, limit=500.0)
    plan = Scheduler(FirstFit(), backfill=True).plan([wide, short], nodes_copy(ns), running, 0.0)
    assert started_ids(plan) == [2]
    plan = Scheduler(FirstFit(), backfill=True).plan([wide, long], nodes_copy(ns), running, 0.0)
    assert started_ids(plan) == []  # would delay the wide job


def test_without_backfill_later_jobs_wait_behind_the_blocked_one():
    ns = nodes("n1:2,n2:2")
    ns["n1"].cpus_used = 2
    running = [Running(99, 100.0, [("n1", 2, 0)])]
    plan = Scheduler(FirstFit(), backfill=False).plan([job(1, n=2, cpus=2), job(2, cpus=1, limit=1.0)], ns,
                                                      running, 0.0)
    assert started_ids(plan) == []


def test_backfill_may_use_nodes_the_blocked_job_will_not_need():
    ns = nodes("n1:2,n2:2,n3:2")
    ns["n1"].cpus_used = 2
    running = [Running(99, 100.0, [("n1", 2, 0)])]
    # job 1 needs 3 whole nodes; a long job on n2 or n3 would delay it
    plan = Scheduler(FirstFit()).plan([job(1, n=3, cpus=2), job(2, cpus=2, limit=1000.0)], ns, running, 0.0)
    assert started_ids(plan) == []
    # job 1 needs 2 whole 2-CPU nodes from t=100: n1 and n2; n3 is too small for it, free for anyone
    ns = nodes("n1:2,n2:2,n3:1")
    ns["n1"].cpus_used = 2
    ns["n2"].cpus_used = 2
    running = [Running(98, 100.0, [("n1", 2, 0)]), Running(99, 100.0, [("n2", 2, 0)])]
    plan = Scheduler(FirstFit()).plan([job(1, n=2, cpus=2), job(2, cpus=1, limit=1000.0)], ns, running, 0.0)
    assert started_ids(plan) == [2]


def test_other_partitions_are_not_blocked_by_a_waiting_job():
    ns = nodes("n1:1", "gpu")
    ns.update(nodes("c1:1", "cpu"))
    ns["n1"].cpus_used = 1
    plan = Scheduler(FirstFit(), backfill=False).plan(
        [job(1, partition="gpu"), job(2, partition="cpu", limit=1e9)], ns, [Running(9, 10.0, [("n1", 1, 0)])], 0.0)
    assert started_ids(plan) == [2]


def test_a_job_that_can_never_fit_is_refused():
    ns = nodes("n1:4,n2:4")
    with pytest.raises(NeverFits, match="2 node"):
        check_feasible(job(1, n=3), ns.values())
    with pytest.raises(NeverFits, match="8 CPUs"):
        check_feasible(job(1, cpus=8), ns.values())
    with pytest.raises(NeverFits, match="does not exist"):
        check_feasible(job(1, partition="nope"), ns.values())
    check_feasible(job(1, n=2, cpus=4), ns.values())


def test_a_pass_over_many_identical_blocked_jobs_is_quick():
    import time

    ns = nodes(",".join(f"n{i}:2" for i in range(100)))
    pending = [job(i, cpus=2) for i in range(10000)]
    t = time.perf_counter()
    plan = Scheduler(FirstFit()).plan(pending, ns, [], 0.0)
    assert len(plan) == 100
    assert time.perf_counter() - t < 10  # generous: this guards against quadratic blow-ups, not speed


def nodes_copy(ns):
    import copy

    return copy.deepcopy(ns)
