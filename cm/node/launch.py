"""Starting a command job's processes on this node, as the submitting user.

Output files are opened by a tiny shell after it has become the user, so
they belong to the user and honour the user's permissions; they close when
the process ends.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from cm.creds import Identity, acting_as
from cm.protocol import CommandShare, ShareSpec

# $1/$2: stdout/stderr paths; the rest is the command, executed without a shell's interpretation
_WRAPPER = 'exec >"$1" 2>"$2" </dev/null || exit 126; shift 2; exec "$@"'


class LaunchError(RuntimeError):
    """The job cannot start here; the message says why, for the user."""


def expand(pattern: str, job_id: int, node: str, rank: int, name: str, user: str) -> str:
    """Slurm-style %j %n %t %x %u (and %% for a percent sign)."""
    out, i = [], 0
    table = {"j": str(job_id), "n": node, "t": str(rank), "x": name, "u": user, "%": "%"}
    while i < len(pattern):
        c = pattern[i]
        if c == "%" and i + 1 < len(pattern) and pattern[i + 1] in table:
            out.append(table[pattern[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def log_paths(spec: ShareSpec, node: str, job_id: int, rank: int, cwd: Path | None = None) -> tuple[Path, Path]:
    """Where a process's stdout and stderr go: the job's patterns (a command's), else cmlogs/ under cwd."""
    cwd = cwd or Path(spec.cwd)
    defaults = {"stdout": f"cmlogs/{job_id}/{node}/{rank}.out", "stderr": f"cmlogs/{job_id}/{node}/{rank}.err"}
    paths = []
    for key in ("stdout", "stderr"):
        pattern = getattr(spec, key, "") or defaults[key]
        paths.append(cwd / expand(pattern, job_id, node, rank, spec.name, spec.user))
    return paths[0], paths[1]


def make_log_dir(directory: Path, who: Identity) -> None:
    """Create directory and its missing parents as the user (so they are the user's, and only where
    the user may create them); raises LaunchError with the reason."""
    with acting_as(who):
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise LaunchError(f"cannot create the log directory {directory}: {exc.strerror or exc}") from None


def check_workdir(cwd: Path, who: Identity, node: str) -> None:
    """The user may enter cwd on this node (checked as the user); raises LaunchError saying why not."""
    with acting_as(who):
        if not cwd.is_dir():
            raise LaunchError(f"working directory {cwd} does not exist on {node} (or you may not reach it)")
        if not os.access(cwd, os.X_OK, effective_ids=True):
            raise LaunchError(f"working directory {cwd} on {node}: permission denied for uid {who.uid}")


def start(spec: CommandShare, node: str, job_id: int,
          extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start every process of this node's share (with extra_env set too); raise LaunchError if none can start."""
    who = job_identity(spec)
    extra = popen_identity(who)
    cwd = Path(spec.cwd)
    check_workdir(cwd, who, node)
    procs_per_node, node_rank = spec.procs, spec.rank
    base_env = dict(e.split("=", 1) for e in spec.env)
    base_env.update(
        CM_JOB_ID=str(job_id), CM_JOB_NAME=spec.name, CM_NODE_RANK=str(node_rank),
        CM_NNODES=str(spec.nnodes), CM_NODELIST=",".join(spec.nodelist), CM_NODENAME=node,
        CM_PROCS_PER_NODE=str(procs_per_node), CM_NPROCS=str(procs_per_node * spec.nnodes),
        CM_CPUS_ON_NODE=str(spec.cpus), CM_SUBMIT_DIR=str(cwd), **(extra_env or {}),
    )
    procs = []
    try:
        for local in range(procs_per_node):
            rank = node_rank * procs_per_node + local
            out, err = log_paths(spec, node, job_id, rank)
            for p in {out.parent, err.parent}:
                make_log_dir(p, who)
            env = {**base_env, "CM_PROC_RANK": str(rank), "CM_LOCAL_RANK": str(local)}
            procs.append(
                subprocess.Popen(
                    ["/bin/sh", "-c", _WRAPPER, "cm-job", str(out), str(err), *spec.argv],
                    cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True, **extra,
                )
            )
    except OSError as exc:
        for p in procs:
            p.kill()
            p.wait()
        raise LaunchError(f"cannot start the job on {node}: {exc}") from None
    return procs


def job_identity(spec: ShareSpec) -> Identity:
    """Who a job acts as: its uid and gid with the user's groups (looked up once).

    Raises LaunchError when this daemon cannot become that user.
    """
    uid, gid = spec.uid, spec.gid
    if os.geteuid() != 0 and uid != os.geteuid():
        raise LaunchError(f"this node's daemon is not root and cannot run jobs as uid {uid}")
    return Identity.of_user(uid, gid)


def popen_identity(who: Identity) -> dict:
    """Popen arguments that make a child run as ``who``.

    Empty when the daemon already is that user: CPython can then start the
    child with vfork, which matters because this daemon is a large process.
    """
    if who.uid == os.geteuid() and who.gid == os.getegid() and set(who.groups) <= set(os.getgroups()):
        return {}
    return {"user": who.uid, "group": who.gid, "extra_groups": list(who.groups)}
