"""What client requests may use of the head (cm.head.requests.Head): a part of HeadState (cm.head.state).

Reads of the job table and the registry, and the changes requests make, which mark the state ``dirty``
(a scheduler pass may act on them) and queue what they ask for in ``out``.
"""

from __future__ import annotations

from cm.head.outcome import Outcome
from cm.head.events import ForgetTokens
from cm.head.records import Job
from cm.head.registry import NodeInfo
from cm.protocol import NodeView as NodeRow
from cm.states import JobState


class Answers:
    """HeadState's side that requests see; uses its jobs, registry, db, admin_policy, out and apply()."""

    def nodes(self) -> dict[str, NodeInfo]:
        return self.registry.nodes

    def node_rows(self) -> list[NodeRow]:
        used = self.jobs.usage()
        rows = []
        for n in sorted(self.registry.nodes.values(), key=lambda n: self.sort_key(n.name)):
            c, m = used.get(n.name, (0, 0))
            rows.append(NodeRow(name=n.name, partition=n.partition, state=self.registry.state_of(n, c).value,
                                cpus=n.cpus, cpus_free=n.cpus - c, mem_mb=n.mem_mb, mem_free_mb=n.mem_mb - m,
                                reason=n.reason))
        return rows

    def active(self, job_id: int) -> Job | None:
        return self.jobs.jobs.get(job_id)

    def find(self, job_id: int) -> Job | None:
        return self.jobs.find(job_id)

    def listed(self, all_jobs: bool) -> list[Job]:
        if all_jobs:
            known = {j["_id"]: j for j in self.jobs.store.recent_jobs(None)}
            known.update(self.jobs.jobs)  # memory is newer for unfinished jobs (progress)
            return [j for _, j in sorted(known.items())]
        return sorted(self.jobs.shown(), key=lambda j: j["_id"])

    def why_waiting(self, job_id: int) -> str | None:
        return self.jobs.why_waiting(job_id)

    def waiting(self, uid: int) -> int:
        waiting = (JobState.PENDING.value, JobState.HELD.value)
        return sum(1 for j in self.jobs.jobs.values() if j["uid"] == uid and j["state"] in waiting)

    def submitted_with(self, uid: int, key: str) -> int | None:
        return self.jobs.submitted_with(uid, key)

    def submit(self, fields: dict) -> Job:
        job = self.jobs.submit(fields)
        self.dirty = True
        return job

    def delete(self, job_id: int) -> None:
        self.jobs.delete(job_id)

    def cancel(self, job_id: int) -> str:
        out = Outcome()
        state = self.jobs.cancel(job_id, out)
        self.apply(out)
        return state

    def hold(self, job_id: int, held: bool) -> bool:
        self.dirty = True
        return self.jobs.hold(job_id, held)

    def set_priority(self, job_id: int, priority: int) -> bool:
        self.dirty = True
        return self.jobs.set_priority(job_id, priority)

    def set_drain(self, node: str, drain: bool, reason: str) -> None:
        self.registry.set_drain(node, drain, reason)
        self.dirty = True

    def set_policy(self, **change) -> None:
        self.db.set_policy(**change)
        self.admin_policy.update(change)
        self.dirty = True  # pending jobs of that user wait (Blocked) or may start

    def stats(self) -> dict:
        return {"pending": len(self.jobs.pending()), "active": len(self.jobs.jobs), "nodes": len(self.registry.nodes),
                "nodes_alive": sum(n.alive for n in self.registry.nodes.values()), "passes": self.passes,
                "last_pass_ms": round(self.pass_seconds * 1000, 3)}

    def metrics(self) -> dict:
        jobs: dict[str, int] = {}
        for job in self.jobs.shown():
            jobs[job["state"]] = jobs.get(job["state"], 0) + 1
        used = self.jobs.usage()
        nodes: dict[str, int] = {}
        for n in self.registry.nodes.values():
            state = self.registry.state_of(n, used.get(n.name, (0, 0))[0]).value
            nodes[state] = nodes.get(state, 0) + 1
        syncs = [j.get("progress") or {} for j in self.jobs.jobs.values() if j["kind"] == "sync"]
        return {"jobs": jobs, "nodes": nodes, "moved": dict(self.moved),
                "sync_bytes_in_flight": sum(p.get("bytes_done", 0) for p in syncs),
                "sync_rate": sum(p.get("rate", 0) for p in syncs), "pass_seconds": self.pass_seconds,
                "passes": self.passes, "waiters": self.waiters}

    def api_token(self, uid: int, user: str, lifetime: float = 0) -> str:
        from cm.api import tokens

        return tokens.issue(self.settings.run_dir, uid, user, lifetime)

    def revoke_api_token(self, uid: int, user: str) -> None:
        from cm.api import tokens

        tokens.revoke(uid, user)
        self.out.append(ForgetTokens())  # the tokens the HTTP API checked lately

