"""cmrun: run a command on nodes of the cluster, like srun/sbatch."""

from __future__ import annotations

import os
import sys

from cm.cli.args import UNPROCESSED, IntRange, argument, command, option
from cm.cli.client import Client, exit_code_of, fail, notify_args, parse_labels, run_command


@command("cmrun", interspersed=False)
@option("-n", "--nodes", type=IntRange(1), default=1, show_default=True, help="nodes, all at once")
@option("-p", "--procs", type=IntRange(1), default=1, show_default=True, help="processes per node")
@option("-c", "--cpus", type=IntRange(1), default=None, help="CPUs per node [default: PROCS]")
@option("-m", "--mem", "mem_mb", type=IntRange(0), default=0, help="memory per node, MB")
@option("-t", "--time", "time_limit", default=None, help="time limit: MM, MM:SS, HH:MM:SS, D-HH")
@option("-J", "--job-name", "name", default=None, help="job name")
@option("--partition", default=None, help="partition [default: the first one]")
@option("-o", "--output", "stdout", default="", help="stdout pattern (%j %n %t %x %u)")
@option("-e", "--error", "stderr", default="", help="stderr pattern (%j %n %t %x %u)")
@option("--requeue", is_flag=True, help="run again elsewhere if a node fails")
@option("--hold", is_flag=True, help="submit held; `cmcontrol release JOBID` lets it run")
@option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="tag the job (repeatable)")
@option("--notify", multiple=True, metavar="URL", help="POST the job's view here when it ends (repeatable)")
@option("--notify-on", default="", metavar="EVENTS", help="begin,end,fail: when --notify POSTs [default: end]")
@option("--wait", is_flag=True, help="wait for the job and exit with its exit code")
@option("--parsable", is_flag=True, help="print only the job id")
@argument("command", nargs=-1, required=True, type=UNPROCESSED)
def cli(nodes, procs, cpus, mem_mb, time_limit, name, partition, stdout, stderr, requeue, hold, labels, notify,
        notify_on, wait, parsable, command):
    """Run COMMAND on NODES nodes, PROCS processes on each."""

    def body() -> None:
        client = Client()
        try:
            cwd = os.getcwd()
        except OSError:
            fail("cmrun", "the current directory no longer exists")
        data = client.submit(
            kind="command", argv=list(command), cwd=cwd, env=[f"{k}={v}" for k, v in os.environ.items()],
            nodes=nodes, procs=procs, cpus=cpus, mem_mb=mem_mb, time=time_limit, name=name, partition=partition,
            stdout=stdout, stderr=stderr, requeue=requeue, hold=hold, labels=parse_labels(labels),
            **notify_args(notify, notify_on),
        )
        job_id = data["job_id"]
        print(job_id if parsable else f"Submitted job {job_id}", flush=True)
        if wait:
            view = client.wait(job_id)
            if not parsable:
                print(f"job {job_id} {view['state']} exit code {view['exit_code']}", file=sys.stderr)
            sys.exit(exit_code_of(view))

    run_command("cmrun", body)


def main() -> None:
    cli.main()
