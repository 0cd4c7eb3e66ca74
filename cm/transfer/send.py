"""``python -m cm.transfer.send``: run one rank of a sync job.

Reads the job's JSON spec (``spec.Spec``) from stdin, prints progress
as one JSON object per line on stdout (a few per second), then a final line
with ``"done": true`` and the counts. Exit status 0 when everything was
copied; 23 when the rest was copied but some files could not be, 24 when the
only files not copied vanished or kept changing while read (each named on a
line of stderr, then a summary line); otherwise a message on stderr and 1
when the transfer failed, 2 for a bad spec, 75 when the receiver or the
network went away (worth another attempt), 143 on SIGTERM (``exitcodes``).

With ``--spare`` it first loads numba and the compiled batch reads, then
waits for a job (``spec.SpareJob``): ``{"transfer": spec, "uid", "gid", "groups", "stderr"}``.
It takes on that user and groups (when it is not that user already) and
that error log, then runs the spec. Empty stdin means the daemon let it go:
it exits 0. With ``--zygote`` it loads the same, then forks a spare for
each request of the node daemon on stdin (``cm.transfer.zygote``): nodes
keep one from their start (see ``cm.node.sync``).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys

from . import exitcodes
from .report import Report
from .sender import Sender, TransferError
from .spec import SpareJob, Spec, SpecError


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _die(code: int, message: str) -> None:
    sys.stderr.write(f"cm.transfer.send: {message}\n")
    sys.stderr.flush()
    os._exit(code)


_running: list[Sender] = []  # the sender at work, for the message of a SIGTERM


def _on_sigterm(signum, frame) -> None:
    # Stop at once: the receiver keeps every chunk verified so far, so a re-run resumes.
    work = _running[0].work if _running else None
    _die(exitcodes.TERMINATED, f"terminated{_kept(work.partial_bytes() if work is not None else 0)}")


def _take_job(job: SpareJob) -> tuple[bytes, int | None]:
    """Spare mode: become the job's user, write errors to its log; returns its transfer spec (JSON) and
    its report's descriptor (None: no report)."""
    uid, gid, groups = job.uid, job.gid, job.groups
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
    if job.stderr:
        try:
            fd = os.open(job.stderr, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"cm.transfer.send: cannot open the error log {job.stderr!r}: {exc}\n")
        else:
            os.dup2(fd, 2)
            os.close(fd)
    report = None
    if job.report:
        try:
            report = os.open(job.report, os.O_WRONLY | os.O_TRUNC | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"cm.transfer.send: cannot open the report {job.report!r}: {exc}\n")
    return bytes(job.transfer), report


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = sys.argv[1:] if argv is None else argv
    spare = "--spare" in args or "--zygote" in args
    signal.signal(signal.SIGTERM, _on_sigterm)
    if spare:
        import encodings.idna  # noqa: F401  (name lookups need it; once the user, we may not read the stdlib)

        from .sender import warm_up

        warm_up()  # before the job arrives: this is the half second a spare saves
    if "--zygote" in args:
        from .zygote import serve

        if not serve(0):
            return exitcodes.OK  # the daemon let the zygote go
        # a forked child from here on: a spare with its job's pipes on stdin and stdout
    raw = sys.stdin.buffer.read()
    if spare and not raw.strip():
        return exitcodes.OK  # the daemon let this spare go
    report_fd = None
    try:
        if spare:
            raw, report_fd = _take_job(SpareJob.from_json(raw))
        spec = Spec.from_json(raw)
    except SpecError as exc:
        sys.stderr.write(f"cm.transfer.send: {exc}\n")
        return exitcodes.BAD_SPEC
    gc.disable()  # a short-lived process building many tuples: collections would only cost time
    sender = Sender(spec, _emit, report=Report(report_fd))
    _running.append(sender)
    try:
        report = sender.run()
    except TransferError as exc:
        _name_errors(sender.stats.errors)
        sys.stderr.write(f"cm.transfer.send: {exc}{_kept(sender.stats.partial_bytes)}\n")
        return exitcodes.TRANSIENT if exc.transient else exitcodes.FAILED
    _emit(report)
    errors = sender.stats.errors
    if not errors:
        return exitcodes.OK
    _name_errors(errors)
    code = exitcodes.VANISHED if sender.stats.vanished == len(errors) else exitcodes.PARTIAL
    what = "vanished or kept changing" if code == exitcodes.VANISHED else "could not be copied"
    files = "file" if len(errors) == 1 else "files"
    sys.stderr.write(f"cm.transfer.send: copied all but {len(errors)} {files}, which {what} "
                     f"(first: {errors[0]}){_kept(sender.stats.partial_bytes)}\n")
    return code


MAX_NAMED = 1000  # errors named one a line in the error log; the summary line counts them all


def _name_errors(errors: list[str]) -> None:
    for line in errors[:MAX_NAMED]:
        sys.stderr.write(f"cm.transfer.send: {line}\n")
    if len(errors) > MAX_NAMED:
        sys.stderr.write(f"cm.transfer.send: ... and {len(errors) - MAX_NAMED} more\n")


def _kept(partial_bytes: int) -> str:
    """What is left at the destination for the next run to resume, in words ("" if nothing)."""
    if not partial_bytes:
        return ""
    return f"; {partial_bytes / (1 << 20):.1f} MiB of unfinished files kept at the destination for the next run"


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # everything is written and closed: skip the interpreter's teardown (~0.1 s with numba)
