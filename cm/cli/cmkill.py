"""cmkill: cancel jobs, like scancel."""

from __future__ import annotations

import sys

from cm.cli.args import argument, command
from cm.cli.client import Client, run_command


@command("cmkill")
@argument("job_ids", nargs=-1, required=True)
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
    cli.main()
