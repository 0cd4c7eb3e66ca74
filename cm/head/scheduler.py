"""Job-level (gang) scheduling with priority order and EASY backfill.

A job gets every node it asks for at once, or waits. Jobs are considered by
priority, then submit time. When the first job in that order cannot start,
it gets a reservation: the earliest time enough resources free up (from the
running jobs' time limits) and the nodes it would get then. A later job may
start now only if it ends before that time or keeps off those nodes, so it
never delays the first blocked job.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Sequence

from cm.head.policies import Placement
from cm.head.resources import Demand, NodeView, Request, Running

Assignment = list[list[str]]  # per demand, the chosen node names


class NeverFits(ValueError):
    """The job asks for more than the cluster could ever give it."""


def place(request: Request, nodes: dict[str, NodeView], policy: Placement) -> Assignment | None:
    """Choose nodes for every demand of request from what is free now, or None.

    Takes the resources on the chosen nodes (in `nodes`) when it succeeds and
    leaves `nodes` untouched when it does not.
    """
    taken: list[tuple[NodeView, int, int]] = []
    result: Assignment = []
    for demand in request.demands:
        candidates = [n for n in nodes.values() if demand.matches(n) and n.fits(demand.cpus, demand.mem_mb)]
        if len(candidates) < demand.count:
            for n, c, m in taken:
                n.give(c, m)
            return None
        chosen = policy.order(candidates)[: demand.count]
        for n in chosen:
            n.take(demand.cpus, demand.mem_mb)
            taken.append((n, demand.cpus, demand.mem_mb))
        result.append([n.name for n in chosen])
    return result


def check_feasible(request: Request, nodes: Iterable[NodeView]) -> None:
    """Raise NeverFits if no state of the cluster could ever run request."""
    nodes = list(nodes)
    for d in request.demands:
        where = f"node {d.node}" if d.node else f"partition {d.partition!r}"
        members = [n for n in nodes if d.matches(n)]
        if not members:
            raise NeverFits(f"{where} does not exist")
        big = [n for n in members if n.cpus >= d.cpus and n.mem_mb >= d.mem_mb]
        if len(big) < d.count:
            most_cpus = max(n.cpus for n in members)
            most_mem = max(n.mem_mb for n in members)
            raise NeverFits(
                f"{where} has {len(members)} node(s) with at most {most_cpus} CPUs and {most_mem} MB each; "
                f"the job asks for {d.count} node(s) with {d.cpus} CPUs and {d.mem_mb} MB"
            )


@dataclass
class Reservation:
    job_id: int
    start: float
    nodes: frozenset[str]


def reserve(request: Request, nodes: dict[str, NodeView], running: Sequence[Running], policy: Placement) -> Reservation | None:
    """When and where request could start if running jobs end at their limits."""
    future = copy.deepcopy(nodes)
    for job in sorted(running, key=lambda r: r.end):
        for name, cpus, mem in job.holds:
            if name in future:
                future[name].give(cpus, mem)
        assignment = place(request, future, policy)
        if assignment is not None:
            return Reservation(request.job_id, job.end, frozenset(n for group in assignment for n in group))
    return None


class Reason:
    """Why a pending job waits, in squeue's words."""

    RESOURCES = "Resources"  # the nodes it needs are busy
    DESTINATION_BUSY = "DestinationBusy"  # a sync: another sync writes into its destination's tree
    PRIORITY = "Priority"  # it would fit, but would delay a job ahead of it
    NODES_DOWN = "ReqNodeNotAvail"  # not enough of the nodes it needs are up and undrained
    HELD = "Held"
    BLOCKED = "Blocked"  # its user is blocked by an administrator
    NONE = "None"  # not looked at yet


class Scheduler:
    """One pass: which pending jobs start now, and on which nodes (and why the others wait: `reasons`)."""

    def __init__(self, policy: Placement, backfill: bool = True):
        self.policy = policy
        self.backfill = backfill
        self.reasons: dict[int, str] = {}

    def plan(
        self, pending: Sequence[Request], nodes: dict[str, NodeView], running: Sequence[Running], now: float
    ) -> list[tuple[Request, Assignment]]:
        """Jobs to start now with their nodes, in start order. `nodes` is updated as jobs are placed."""
        started: list[tuple[Request, Assignment]] = []
        reservation: Reservation | None = None
        blocked_partitions: set[tuple] = set()
        failed: list[Demand] = []  # demands known not to fit now: skip anything at least as big
        self.reasons = reasons = {}
        available: dict[tuple, bool] = {}

        def lacking(request: Request) -> str:
            """ReqNodeNotAvail when too few usable nodes could ever hold a demand, else Resources."""
            for d in request.demands:
                key = (d.key, d.count, d.cpus, d.mem_mb)
                if key not in available:
                    big = sum(1 for n in nodes.values()
                              if n.usable and d.matches(n) and n.cpus >= d.cpus and n.mem_mb >= d.mem_mb)
                    available[key] = big >= d.count
                if not available[key]:
                    return Reason.NODES_DOWN
            return Reason.RESOURCES

        writing = [r.writes for r in running if r.writes is not None]  # two syncs into one tree never interleave

        for request in sorted(pending, key=lambda r: r.order_key):
            if request.writes is not None and any(request.writes.overlaps(w, nodes) for w in writing):
                reasons[request.job_id] = Reason.DESTINATION_BUSY
                continue
            if any(d.at_least(f) for d in request.demands for f in failed) and len(request.demands) == 1:
                reasons[request.job_id] = lacking(request)
                continue
            if reservation is not None and not self.backfill:
                if any(d.key in blocked_partitions for d in request.demands):
                    reasons[request.job_id] = Reason.PRIORITY
                    continue
            assignment = place(request, nodes, self.policy)
            if assignment is None:
                reasons[request.job_id] = lacking(request)
                if len(request.demands) == 1:
                    failed.append(request.demands[0])
                if reservation is None:
                    blocked_partitions = {d.key for d in request.demands}
                    reservation = reserve(request, nodes, running, self.policy)
                    if reservation is None:
                        reservation = Reservation(request.job_id, float("inf"), frozenset())
                continue
            if reservation is not None and self.backfill:
                chosen = {n for group in assignment for n in group}
                ends_in_time = now + request.time_limit <= reservation.start
                if not ends_in_time and chosen & reservation.nodes:
                    for d, group in zip(request.demands, assignment):
                        for name in group:
                            nodes[name].give(d.cpus, d.mem_mb)
                    reasons[request.job_id] = Reason.PRIORITY
                    continue
            started.append((request, assignment))
            if request.writes is not None:
                writing.append(request.writes)
        return started
