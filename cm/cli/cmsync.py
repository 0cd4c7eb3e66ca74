"""cmsync: copy a directory tree between partitions' storage, like rsync -a."""

from __future__ import annotations

import os
import sys
import time

from cm.cli.args import Choice, Convert, IntRange, argument, command, option
from cm.cli.client import Client, exit_code_of, notify_args, parse_labels, run_command
from cm.cli.cminfo import human_bytes
from cm.timefmt import format_duration

_UNITS = {"": 1024, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_rate(text: str) -> int | None:
    """rsync's --bwlimit: a number of KiB/s, or with a suffix B, K, M, G (per second); empty: no limit."""
    if not text.strip():
        return None
    import re  # only here: with its enum, ~4 ms of every cmsync's start

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([BKMGT]?)(?:I?B)?(?:/S)?\s*", text.upper())
    rate = float(m.group(1)) * _UNITS[m.group(2)] if m else 0.0
    if not 1 <= rate < 2**63:
        raise ValueError(f"{text!r} is not a rate like 500K, 10M or 1G")
    return int(rate)


def progress_bar(view: dict, width: int = 30) -> str:
    t = view.get("transfer") or {}
    pct = view["progress"] or 0.0
    filled = int(width * pct / 100)
    rate = t.get("rate") or 0
    left = t.get("bytes_total", 0) - t.get("bytes_done", 0)
    eta = format_duration(left / rate) if rate > 0 and left > 0 else "--:--"
    return (f"\r[{'#' * filled}{'.' * (width - filled)}] {pct:5.1f}% "
            f"{human_bytes(t.get('bytes_done', 0))}/{human_bytes(t.get('bytes_total', 0))} "
            f"{t.get('files_done', 0)}/{t.get('files_total', 0)} files {human_bytes(rate)}/s ETA {eta}  ")


@command("cmsync")
@option("-n", "--nodes", type=IntRange(1), default=1, show_default=True,
        help="source nodes (and as many destination nodes)")
@option("--delete", is_flag=True, help="delete files in DST that are not in SRC")
@option("--dry-run", is_flag=True, help="show what would change, change nothing")
@option("--checksum", is_flag=True, help="compare content, not size and mtime")
@option("--exclude", multiple=True, help="skip files matching PATTERN (repeatable)")
@option("--bwlimit", type=Convert(parse_rate, "rate"), default=None, help="limit bandwidth: KiB/s, or 500K, 10M, 1G")
@option("--transport", type=Choice(["tcp", "rdma"]), default="tcp", show_default=True)
@option("--policy", type=Choice(["size-balanced", "round-robin"]), default="size-balanced",
        show_default=True, help="how work is spread across nodes")
@option("--no-hard-links", is_flag=True, help="copy each hard link as a file of its own")
@option("--no-xattrs", is_flag=True, help="do not copy extended attributes")
@option("--no-acls", is_flag=True, help="do not copy POSIX ACLs")
@option("-a", "--archive", "rsync_archive", is_flag=True, hidden=True)  # rsync's; what cmsync always does
@option("-H", "--hard-links", "rsync_hard_links", is_flag=True, hidden=True)
@option("-A", "--acls", "rsync_acls", is_flag=True, hidden=True)
@option("-X", "--xattrs", "rsync_xattrs", is_flag=True, hidden=True)
@option("-S", "--sparse", "rsync_sparse", is_flag=True, hidden=True)
@option("-t", "--time", "time_limit", default=None, help="time limit: MM, MM:SS, HH:MM:SS, D-HH")
@option("-J", "--job-name", "name", default=None, help="job name")
@option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="tag the job (repeatable)")
@option("--notify", multiple=True, metavar="URL", help="POST the job's view here when it ends (repeatable)")
@option("--notify-on", default="", metavar="EVENTS", help="begin,end,fail: when --notify POSTs [default: end]")
@option("--wait", is_flag=True, help="wait for the job; exit 0 if it copied everything (24: all but files that vanished)")
@option("--parsable", is_flag=True, help="print only the job id")
@argument("src")
@argument("dst")
def cli(nodes, delete, dry_run, checksum, exclude, bwlimit, transport, policy, no_hard_links, no_xattrs, no_acls,
        rsync_archive, rsync_hard_links, rsync_acls, rsync_xattrs, rsync_sparse, time_limit, name, labels, notify,
        notify_on, wait, parsable, src, dst):
    """Copy SRC to DST; each is PARTITION:/path or NODE:/path inside that partition's storage.

    Hard links, extended attributes, POSIX ACLs, sparse files, fifos and
    sockets are kept (rsync's -aHAXS are accepted and change nothing).
    """

    def body() -> None:
        client = Client()
        try:
            cwd = os.getcwd()
        except OSError:
            cwd = "/"
        data = client.submit(
            kind="sync", src=src, dst=dst, nodes=nodes, time=time_limit, name=name, cwd=cwd,
            options={"delete": delete, "dry_run": dry_run, "checksum": checksum, "exclude": list(exclude),
                     "bwlimit": bwlimit, "transport": transport, "policy": policy,
                     "hard_links": not no_hard_links, "xattrs": not no_xattrs, "acls": not no_acls},
            labels=parse_labels(labels), **notify_args(notify, notify_on),
        )
        job_id = data["job_id"]
        print(job_id if parsable else f"Submitted sync job {job_id}", flush=True)
        if not wait:
            return
        tty = sys.stderr.isatty() and not parsable
        started = time.monotonic()

        def show(view: dict) -> None:
            if tty and view["state"] == "RUNNING":
                sys.stderr.write(progress_bar(view))
                sys.stderr.flush()

        view = client.wait(job_id, on_update=show)
        if tty:
            sys.stderr.write(progress_bar(view) + "\n")
        if not parsable:
            t = view.get("transfer") or {}
            skipped = f" with {t['skipped']} skipped: see cminfo {job_id} --files," if t.get("skipped") else ""
            print(f"job {job_id} {view['state']}{skipped} in {time.monotonic() - started:.1f} s: "
                  f"{human_bytes(t.get('bytes_done', 0))}, {t.get('files_done', 0)} files"
                  + (f" ({view['reason']})" if view.get("reason") and (view["state"] != "COMPLETED"
                                                                or view.get("exit_code")) else ""),
                  file=sys.stderr)
        sys.exit(exit_code_of(view))

    run_command("cmsync", body)


def main() -> None:
    cli.main()
