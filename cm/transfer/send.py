"""``python -m cm.transfer.send``: run one rank of a sync job.

Reads the job's JSON spec (see ``sender.Spec``) from stdin, prints progress
as one JSON object per line on stdout (a few per second), then a final line
with ``"done": true`` and the counts. Exit status 0 on success; otherwise a
one-line message on stderr and a non-zero status: 1 when the transfer
failed or some paths could not be copied, 2 for a bad spec, 75 when the
receiver or the network went away (worth another attempt), 143 on SIGTERM.

With ``--spare`` it first loads numba and the compiled checksums, then
waits for a job: ``{"transfer": spec, "uid", "gid", "groups", "stderr"}``.
It takes on that user and groups (when it is not that user already) and
that error log, then runs the spec. Empty stdin means the daemon let it go:
it exits 0. Nodes keep one started ahead of need (see ``cm.node.sync``).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys

from .sender import Sender, TransferError
from .spec import Spec, SpecError

EXIT_FAILED = 1
EXIT_BAD_SPEC = 2
EXIT_TRANSIENT = 75  # EX_TEMPFAIL: the receiver or the network went away; worth another attempt
EXIT_TERMINATED = 143


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _die(code: int, message: str) -> None:
    sys.stderr.write(f"cm.transfer.send: {message}\n")
    sys.stderr.flush()
    os._exit(code)


def _on_sigterm(signum, frame) -> None:
    # Stop at once: the receiver keeps every chunk verified so far, so a re-run resumes.
    _die(EXIT_TERMINATED, "terminated")


def _take_job(job: dict) -> dict:
    """Spare mode: become the job's user, write errors to its log; returns its transfer spec."""
    if not isinstance(job, dict) or not {"transfer", "uid", "gid", "groups"} <= set(job):
        raise SpecError("a spare's job needs transfer, uid, gid and groups")
    uid, gid, groups = job["uid"], job["gid"], job["groups"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in [uid, gid, *groups]):
        raise SpecError("uid, gid and groups must be integers")
    try:
        if (uid, gid) == (os.geteuid(), os.getegid()) and set(groups) <= set(os.getgroups()):
            pass  # already this user
        elif os.geteuid() == 0:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
        else:
            raise PermissionError(f"running as uid {os.geteuid()}, not root")
    except OSError as exc:
        raise SpecError(f"cannot become uid {uid} gid {gid}: {exc}") from None
    if job.get("stderr"):
        try:
            fd = os.open(job["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except (OSError, TypeError, ValueError) as exc:
            sys.stderr.write(f"cm.transfer.send: cannot open the error log {job['stderr']!r}: {exc}\n")
        else:
            os.dup2(fd, 2)
            os.close(fd)
    return job["transfer"]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    spare = "--spare" in (sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if spare:
        import encodings.idna  # noqa: F401  (name lookups need it; once the user, we may not read the stdlib)

        from .sender import warm_up

        warm_up()  # before the job arrives: this is the half second a spare saves
    raw = sys.stdin.read()
    if spare and not raw.strip():
        return 0  # the daemon let this spare go
    try:
        data = json.loads(raw)
        spec = Spec.from_dict(_take_job(data) if spare else data)
    except json.JSONDecodeError as exc:
        sys.stderr.write(f"cm.transfer.send: the spec on stdin is not JSON: {exc}\n")
        return EXIT_BAD_SPEC
    except SpecError as exc:
        sys.stderr.write(f"cm.transfer.send: {exc}\n")
        return EXIT_BAD_SPEC
    gc.disable()  # a short-lived process building many tuples: collections would only cost time
    sender = Sender(spec, _emit)
    try:
        report = sender.run()
    except TransferError as exc:
        sys.stderr.write(f"cm.transfer.send: {exc}\n")
        return EXIT_TRANSIENT if exc.transient else EXIT_FAILED
    _emit(report)
    errors = sender.stats.errors
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        sys.stderr.write(f"cm.transfer.send: {errors[0]}{more}\n")
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # everything is written and closed: skip the interpreter's teardown (~0.1 s with numba)
