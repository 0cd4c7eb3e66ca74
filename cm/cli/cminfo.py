"""cminfo: nodes and jobs, like sinfo + squeue in one.

Tables are tabulate's "plain" layout, made here (tests/test_pure.py checks it
against tabulate): importing tabulate costs a command ~30 ms, more than the
rest of its start.
"""

from __future__ import annotations

from cm.cli.args import argument, command, option
from cm.cli.client import Client, parse_labels, run_command
from cm.timefmt import format_duration


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def nodes_table(nodes: list[dict]) -> str:
    rows = [[n["name"], n["partition"], n["state"], f"{n['cpus_free']}/{n['cpus']}",
             f"{n['mem_free_mb']}/{n['mem_mb']}"] for n in nodes]
    return plain_table(rows, ["NAME", "PARTITION", "STATE", "CPUS(free/total)", "MEMORY(free/total)"])


def progress_text(job: dict) -> str:
    if job["progress"] is None:
        return ""
    t = job.get("transfer") or {}
    text = f"{job['progress']:.0f}%"
    if t.get("rate") and job["state"] == "RUNNING":
        text += f" {human_bytes(t['rate'])}/s"
    return text


def plain_table(rows: list[list[str]], headers: list[str]) -> str:
    """tabulate's "plain" layout of strings (tabulate itself costs ~40 us a cell, 0.4 s for 10,000 jobs)."""
    widths = [max([len(h) + 2, *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]  # tabulate pads headers by 2
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def jobs_table(jobs: list[dict]) -> str:
    rows = []
    for j in jobs:
        nodes = ",".join(j["nodes"]) if j["nodes"] else (f"({j['reason']})" if j["reason"] else "")
        rows.append([str(j["id"]), j["name"][:20], j["user"], j["type"], j["state"],
                     format_duration(j["elapsed"]), nodes, progress_text(j)])
    return plain_table(rows, ["ID", "NAME", "USER", "TYPE", "STATE", "TIME", "NODES", "PROGRESS"])


def job_details(job: dict) -> str:
    lines = []
    for key in ("id", "name", "user", "type", "state", "exit_code", "partition", "nodes", "num_nodes", "priority",
                "submitted", "started", "ended", "elapsed", "time_limit", "progress", "reason", "command",
                "workdir"):
        value = job.get(key)
        if key in ("elapsed", "time_limit"):
            value = format_duration(value)
        elif key == "nodes":
            value = ",".join(value)
        lines.append(f"{key.upper():>10}: {'' if value is None else value}")
    for i, (key, value) in enumerate(sorted((job.get("labels") or {}).items())):
        lines.append(f"{'LABELS' if i == 0 else '':>10}: {key}={value}")
    for i, var in enumerate(job.get("env") or []):
        lines.append(f"{'ENV' if i == 0 else '':>10}: {var}")
    if job.get("notify"):
        lines.append(f"{'NOTIFY':>10}: {job['notify']}")  # webhook deliveries that failed for good
    t = job.get("transfer") or {}
    if t:
        lines.append(f"{'TRANSFER':>10}: {human_bytes(t.get('bytes_done', 0))} of {human_bytes(t.get('bytes_total', 0))}, "
                     f"{t.get('files_done', 0)} of {t.get('files_total', 0)} files, "
                     f"{t.get('files_skipped', 0)} skipped, {t.get('retries', 0)} retries")
        if t.get("skipped"):
            lines.append(f"{'NOT COPIED':>10}: {t['skipped']} (see cminfo {job['id']} --files)")
    return "\n".join(lines)


def file_line(line: dict) -> str:
    """One line of a sync's per-file report, for people: action, path and what else it says."""
    text = f"{line['action']:<8} {line['path']}"
    if line.get("link"):
        text += f" => {line['link']}"
    if line.get("target"):
        text += f" -> {line['target']}"
    if line.get("what"):
        text += f" ({line['what']})"
    if line.get("reason"):
        text += f": {line['reason']}"
    if line.get("xxh3"):
        text += f"  xxh3:{line['xxh3']}"
    elif line.get("chunks_xxh3"):
        text += f"  {len(line['chunks_xxh3'])} chunks" + (
            f", {line['chunks_resumed']} verified before" if line.get("chunks_resumed") else "")
    return text + ("  (dry run)" if line.get("dry_run") else "")


@command("cminfo")
@argument("job_id", type=int, required=False)
@option("--all", "all_", is_flag=True, help="include jobs that finished long ago")
@option("--json", "as_json", is_flag=True, help="one JSON object: nodes and jobs")
@option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="only jobs with this label (repeatable)")
@option("--files", is_flag=True, help="with JOB_ID: the sync's per-file report (created, updated, deleted, ...)")
def cli(job_id, all_, as_json, labels, files):
    """Show the cluster's nodes and jobs, or one job in detail."""

    def body() -> None:
        if files:
            if job_id is None:
                raise SystemExit("cminfo: --files needs a JOB_ID")
            show_files(Client(), job_id, as_json)
            return
        wanted = [f"{k}={v}" for k, v in parse_labels(labels).items()]
        data = Client().call("info", job_id=job_id, all=all_, **({"label": wanted} if wanted else {}))
        if as_json:
            import json

            print(json.dumps(data, indent=None))
            return
        if job_id is not None:
            job = data["jobs"][0]
            print(job_details(job))
            if (job.get("transfer") or {}).get("skipped"):
                page = Client().call("files", job_id=job_id, action="skipped", limit=10)
                for line in page["files"]:
                    print(f"{'':>10}  {line['path']}: {line.get('reason', '')}")
            return
        print(nodes_table(data["nodes"]))
        print()
        print(jobs_table(data["jobs"]) if data["jobs"] else "no jobs")

    run_command("cminfo", body)


def show_files(client: Client, job_id: int, as_json: bool) -> None:
    """Every line of the job's report, a page at a time."""
    import json

    offset: int | None = 0
    while offset is not None:
        page = client.call("files", job_id=job_id, offset=offset, limit=5000)
        for line in page["files"]:
            print(json.dumps(line) if as_json else file_line(line))
        offset = page["next"]


def main() -> None:
    cli.main()
