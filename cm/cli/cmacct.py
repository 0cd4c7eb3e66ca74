"""cmacct: what ran, like sacct: finished jobs by when they ended, with totals per user and partition pair.

It asks the HTTP API on the head's RUN_DIR/api.sock (GET /v1/jobs?ended_after=...), whose thread reads
the database off the head's loop (cm.acct); who you are is what the kernel says of the socket.
"""

from __future__ import annotations

import re
import time

from cm.cli.args import command, option
from cm.cli.client import HeadError, parse_labels, run_command
from cm.cli.cminfo import human_bytes, plain_table
from cm.timefmt import format_duration

FIELDS = ("JobID", "JobName", "User", "State", "Elapsed", "ExitCode", "NodeList", "Bytes", "Files", "Partition",
          "Submit", "Start", "End", "NodeHours")
DEFAULT_FORMAT = "JobID,JobName,User,State,Elapsed,ExitCode,NodeList,Bytes,Files"
STATES = {"CD": "COMPLETED", "F": "FAILED", "CA": "CANCELLED", "TO": "TIMEOUT", "NF": "NODE_FAIL"}  # sacct's
UNITS = {"": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1, "min": 60, "minute": 60, "minutes": 60, "m": 60,
         "h": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400, "week": 604800,
         "weeks": 604800, "w": 604800}


def _midnight(now: float, days: int = 0) -> float:
    t = time.localtime(now)
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday + days, 0, 0, 0, 0, 0, -1))


def parse_when(text: str, now: float | None = None) -> float:
    """sacct's -S/-E forms as epoch seconds: YYYY-MM-DD[THH:MM[:SS]], MM/DD[/YY], HH:MM[:SS] (today),
    now[{+|-}N[unit]] (units seconds, minutes, hours, days, weeks), today/midnight, yesterday, tomorrow."""
    now = time.time() if now is None else now
    raw = text.strip()
    word = raw.lower()
    named = {"today": 0, "midnight": 0, "yesterday": -1, "tomorrow": 1}
    if word in named:
        return _midnight(now, named[word])
    m = re.fullmatch(r"now(?:([+-])(\d+)([a-z]*))?", word)
    if m:
        if not m.group(1):
            return now
        unit = UNITS.get(m.group(3))
        if unit is None:
            raise ValueError(f"{text!r}: unknown unit {m.group(3)!r} (seconds, minutes, hours, days, weeks)")
        return now + (1 if m.group(1) == "+" else -1) * int(m.group(2)) * unit
    m = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)(?:[T ](\d\d):(\d\d)(?::(\d\d))?)?", raw)
    if m:
        y, mo, d, h, mi, s = (int(g or 0) for g in m.groups())
        return time.mktime((y, mo, d, h, mi, s, 0, 0, -1))
    m = re.fullmatch(r"(\d\d?)/(\d\d?)(?:/(\d\d))?", raw)
    if m:
        year = 2000 + int(m.group(3)) if m.group(3) else time.localtime(now).tm_year
        return time.mktime((year, int(m.group(1)), int(m.group(2)), 0, 0, 0, 0, 0, -1))
    m = re.fullmatch(r"(\d\d?):(\d\d)(?::(\d\d))?", raw)
    if m:
        return _midnight(now) + int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3) or 0)
    raise ValueError(f"{text!r} is not a time: use YYYY-MM-DD[THH:MM[:SS]], MM/DD[/YY], HH:MM[:SS], "
                     "now-2days, today or yesterday")


def parse_format(text: str) -> list[str]:
    """--format=JobID,JobName,...: field names, any case, as sacct's."""
    by_lower = {f.lower(): f for f in FIELDS}
    fields = []
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        if name.lower() not in by_lower:
            raise ValueError(f"unknown field {name!r}: use {', '.join(FIELDS)}")
        fields.append(by_lower[name.lower()])
    if not fields:
        raise ValueError("--format names no field")
    return fields


def parse_states(text: str) -> list[str]:
    states = []
    for name in (n.strip().upper() for n in text.split(",")):
        if name:
            states.append(STATES.get(name, name))
    return states


def _stamp(ts: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts)) if ts else "Unknown"


def field_value(job: dict, name: str, parsable: bool) -> str:
    """One field of a job (a JobView) as cmacct shows it; bytes exact in --parsable, human otherwise."""
    transfer = job.get("transfer") or {}
    times = job.get("times") or {}
    if name == "JobID":
        return str(job["id"])
    if name == "JobName":
        return job["name"]
    if name == "User":
        return job["user"]
    if name == "State":
        return job["state"]
    if name == "Elapsed":
        return format_duration(job.get("elapsed") or 0)
    if name == "ExitCode":
        return str(job.get("exit_code") or 0)
    if name == "NodeList":
        return ",".join(job.get("nodes") or []) or "None"
    if name == "Bytes":
        done = transfer.get("bytes_done", 0)
        return str(done) if parsable else human_bytes(done)
    if name == "Files":
        return str(transfer.get("files_done", 0))
    if name == "Partition":
        return job.get("partition") or ""
    if name == "NodeHours":
        started, ended = times.get("started"), times.get("ended")
        hours = (ended - started) * max(1, len(set(job.get("nodes") or []))) / 3600 if started and ended else 0.0
        return f"{hours:.3f}"
    return _stamp(times.get({"Submit": "submitted", "Start": "started", "End": "ended"}[name]))


def totals_tables(totals: dict) -> str:
    out = []
    for table, key, title in (("users", "user", "USER"), ("pairs", "pair", "PARTITIONS")):
        rows = [[r[key], str(r["jobs"]), human_bytes(r["bytes"]), str(r["files"]), f"{r['node_hours']:.3f}"]
                for r in totals.get(table, [])]
        out.append(plain_table(rows, [title, "JOBS", "BYTES", "FILES", "NODE-HOURS"]))
    return "\n\n".join(out)


@command("cmacct")
@option("-S", "--starttime", "start", default="today", help="jobs that ended at or after this [default: today 00:00]")
@option("-E", "--endtime", "end", default="", help="... and before this [default: now]")
@option("-u", "--user", default="", help="this user's jobs [default: yours]")
@option("-a", "--allusers", is_flag=True, help="every user's jobs (administrators)")
@option("-s", "--state", "states", default="", help="only these states, comma-separated (CD, F, CA, TO, NF too)")
@option("--name", default="", help="only jobs of this name")
@option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="only jobs with this label (repeatable)")
@option("-o", "--format", "fields", default=DEFAULT_FORMAT, help=f"fields: {','.join(FIELDS)}")
@option("--json", "as_json", is_flag=True, help="the whole answer as one JSON object: jobs and totals")
@option("-P", "--parsable", is_flag=True, help="'|'-separated fields, no header, no totals (sacct -P -n)")
def cli(start, end, user, allusers, states, name, labels, fields, as_json, parsable):
    """Finished jobs that ended between -S and -E, with totals per user and partition pair."""

    def body() -> None:
        from cm.api.client import ApiError, Client

        try:
            after = parse_when(start)
            before = parse_when(end) if end else None
            columns = parse_format(fields)
        except ValueError as exc:
            raise HeadError(str(exc)) from None
        if allusers and user:
            raise HeadError("give -u USER or --allusers, not both")
        import os
        import pwd

        try:
            me: str | None = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:  # no name: the head says who the socket's peer is (and gives them their own jobs)
            me = None
        try:
            data = Client().accounting(after, before, user=user or (None if allusers else me), all_users=allusers,
                                       states=parse_states(states), name=name or None, labels=parse_labels(labels))
        except ApiError as exc:
            raise HeadError(exc.message or str(exc)) from None
        if as_json:
            import json

            print(json.dumps(data))
            return
        rows = [[field_value(j, f, parsable) for f in columns] for j in data["jobs"]]
        if parsable:
            for row in rows:
                print("|".join(row))
            return
        print(plain_table(rows, columns) if rows else "no jobs ended then")
        if data.get("truncated"):
            print(f"(only the first {len(rows)} jobs; narrow the window)")
        print()
        print(totals_tables(data["totals"]))

    run_command("cmacct", body)


def main() -> None:
    cli.main()
