"""A node's share of a sync job: a sender process on the source side,
a registration with this node's mover on the destination side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cm.node.launch import LaunchError, _make_dirs, identity, log_paths


def start_sender(spec: dict, node: str, job_id: int, data_root: str) -> tuple[subprocess.Popen, Path]:
    """Start `python -m cm.transfer.send` as the user; progress comes back on its stdout."""
    uid, gid = spec["uid"], spec["gid"]
    extra = identity(uid, gid)
    transfer = {**spec["transfer"], "src_root": data_root}
    cwd = Path(spec.get("cwd") or "/")
    _, err_path = log_paths({**spec, "cwd": str(cwd), "stdout": "", "stderr": ""}, node, job_id, spec["rank"])
    try:
        _make_dirs(err_path.parent, uid, gid)
        err = open(err_path, "ab")
        if os.geteuid() == 0:
            os.chown(err_path, uid, gid)
    except OSError:
        err_path = Path(os.devnull)
        err = open(os.devnull, "ab")
    env = {k: v for k, v in os.environ.items() if k.startswith(("CM_", "NUMBA_", "PATH", "HOME", "LANG", "LC_"))}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cm.transfer.send"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
            start_new_session=True, close_fds=True, cwd="/", env=env, **extra,
        )
    except OSError as exc:
        raise LaunchError(f"cannot start the sender on {node}: {exc}") from None
    finally:
        err.close()
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(transfer).encode())
    proc.stdin.close()
    os.set_blocking(proc.stdout.fileno(), False)
    return proc, err_path


def last_line(path: Path, limit: int = 4096) -> str:
    """The last non-empty line of a (small) error log, for the job's reason."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""
