"""The purge service: time limits, stopping jobs, reaping what exited.

Every process of a job leads its own session, so stopping a job signals whole
process groups. Stopping is SIGTERM, then SIGKILL after the grace period.
Exit codes come from the kernel (waitpid); a process killed by signal N
counts as 128+N, as in a shell. Nothing here depends on zombies staying
around: a process is reaped as soon as it is seen to exit.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Callable

from cm.logs import event
from cm.protocol import ShareKey
from cm.states import JobState

log = logging.getLogger("cm.node.purge")


@dataclass
class Tracked:
    """The processes of one share of a job on this node."""

    job_id: int
    run: int
    procs: list[subprocess.Popen]
    deadline: float  # monotonic time the job must end by
    role: str = "run"
    rank: int = 0
    stop_state: JobState | None = None
    reason: str = ""
    kill_at: float | None = None
    exit_codes: dict[int, int] = field(default_factory=dict)  # index in procs -> code
    on_end: Callable[[], None] | None = None  # extra clean-up (e.g. close pipes)

    @property
    def share(self) -> ShareKey:
        return ShareKey(self.job_id, self.run, self.role, self.rank)


@dataclass(frozen=True)
class Finished:
    job_id: int
    run: int
    state: JobState
    exit_code: int
    reason: str
    role: str = "run"
    rank: int = 0

    @property
    def share(self) -> ShareKey:
        return ShareKey(self.job_id, self.run, self.role, self.rank)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def exit_code_of(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class Purge:
    def __init__(self, grace: float):
        self.grace = grace
        self.jobs: dict[ShareKey, Tracked] = {}

    def add(self, tracked: Tracked) -> None:
        self.jobs[tracked.share] = tracked

    def stop(self, share: ShareKey, state: JobState, reason: str, now: float) -> bool:
        """Ask a share's processes to end (SIGTERM now, SIGKILL after the grace). False if unknown."""
        job = self.jobs.get(share)
        if job is None:
            return False
        if job.stop_state is None:
            job.stop_state, job.reason = state, reason
            job.kill_at = now + self.grace
            for i, proc in enumerate(job.procs):
                if i not in job.exit_codes:
                    _signal_group(proc.pid, signal.SIGTERM)
            event(log, "stopping job", job=job.job_id, run=job.run, role=job.role, rank=job.rank, state=state.value,
                  reason=reason)
        return True

    def tick(self, now: float) -> list[Finished]:
        """Reap exited processes, enforce deadlines; return the jobs that are over."""
        done = []
        for job in list(self.jobs.values()):
            for i, proc in enumerate(job.procs):
                if i not in job.exit_codes:
                    code = proc.poll()
                    if code is not None:
                        job.exit_codes[i] = exit_code_of(code)
            if len(job.exit_codes) == len(job.procs):
                for proc in job.procs:
                    _signal_group(proc.pid, signal.SIGKILL)  # leftovers a process left behind
                del self.jobs[job.share]
                if job.on_end:
                    job.on_end()
                done.append(self._result(job))
                continue
            if job.stop_state is None and now >= job.deadline:
                self.stop(job.share, JobState.TIMEOUT, "time limit reached", now)
            elif job.kill_at is not None and now >= job.kill_at:
                for i, proc in enumerate(job.procs):
                    if i not in job.exit_codes:
                        _signal_group(proc.pid, signal.SIGKILL)
                job.kill_at = now + self.grace  # keep at it until the kernel reports them gone
        return done

    @staticmethod
    def _result(job: Tracked) -> Finished:
        codes = [job.exit_codes[i] for i in range(len(job.procs))]
        exit_code = next((c for c in codes if c != 0), 0)
        if job.stop_state is not None:
            state = job.stop_state
        else:
            state = JobState.COMPLETED if exit_code == 0 else JobState.FAILED
        return Finished(job.job_id, job.run, state, exit_code, job.reason, job.role, job.rank)

    def next_deadline(self) -> float | None:
        times = [j.kill_at if j.kill_at is not None else j.deadline for j in self.jobs.values()]
        return min(times) if times else None

    def stop_all(self, now: float) -> None:
        for share in list(self.jobs):
            self.stop(share, JobState.NODE_FAIL, "node daemon stopping", now)


def pid_alive(pid: int) -> bool:
    """Running, and not a zombie waiting for someone else (PID 1) to reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False
