"""cmkill: cancel jobs, like scancel."""

from __future__ import annotations

import sys

import click

from cm.cli.client import Client, main_of, run_command


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("job_ids", nargs=-1, required=True)
def cli(job_ids):
    """Cancel JOB_IDS: pending jobs never run, running ones are stopped on every node."""

    def body() -> None:
        ids = []
        bad = False
        for text in job_ids:
            try:
                ids.append(int(text))
            except ValueError:
                print(f"cmkill: error: invalid job id {text!r}", file=sys.stderr)
                bad = True
        if ids:
            results = Client().call("cancel", job_ids=ids)
            for job_id in ids:
                r = results[str(job_id)]
                if r["ok"]:
                    print(f"job {job_id} {r['state']}")
                else:
                    print(f"cmkill: error: {r['error']}", file=sys.stderr)
                    bad = True
        sys.exit(1 if bad else 0)

    run_command("cmkill", body)


def main() -> None:
    main_of(cli, "cmkill")
