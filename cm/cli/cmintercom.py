"""cmintercom: the intercom from a shell inside a cm job (put, get, fence, send, recv, reply).

Exit codes: 0 done, 124 timed out, 1 error (message on stderr).
"""

from __future__ import annotations

import sys
from typing import Callable

import click

from cm.intercom import Intercom, IntercomError, Timeout

TIMED_OUT = 124


def _run(action: Callable[[Intercom], None]) -> None:
    try:
        with Intercom() as ic:
            action(ic)
    except Timeout as exc:
        print(f"cmintercom: timed out: {exc}", file=sys.stderr)
        sys.exit(TIMED_OUT)
    except (IntercomError, TypeError, ValueError) as exc:
        print(f"cmintercom: error: {exc}", file=sys.stderr)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Keys and commands shared by the processes of this job (CM_INTERCOM names the node's socket)."""


@cli.command()
@click.argument("key")
@click.argument("value")
def put(key, value):
    """Set KEY to VALUE for every process of the job."""
    _run(lambda ic: ic.put(key, value))


@cli.command()
@click.argument("key")
@click.option("--timeout", type=float, default=None, help="seconds to wait for the key's first put")
def get(key, timeout):
    """Print KEY's value (waiting for its first put)."""
    _run(lambda ic: print(ic.get(key, timeout)))


@cli.command()
@click.option("--timeout", type=float, default=None, help="seconds to wait for the other processes")
def fence(timeout):
    """Return once every process of the job has reached a fence."""
    _run(lambda ic: ic.fence(timeout))


@cli.command()
@click.argument("command")
@click.option("--to", "to", default="", help="'' everyone, rank==N, node==NAME, re:PATTERN over NODE/RANK")
@click.option("--wait-reply", type=float, default=None, metavar="S", help="then wait S seconds for a reply, print it")
def send(command, to, wait_reply):
    """Send COMMAND; print how many processes it reached (and the first reply)."""

    def action(ic: Intercom) -> None:
        print(ic.send(command, to), flush=True)
        if wait_reply is not None:
            # a reply that came before this is queued for this rank on the node: it is taken here, not missed
            text, sender = ic.recv(wait_reply, replies=True)
            print(f"{sender} {text}")

    _run(action)


@cli.command()
@click.option("--timeout", type=float, default=None, help="seconds to wait for a command")
def recv(timeout):
    """Print the next command sent to this process as SENDER COMMAND."""

    def action(ic: Intercom) -> None:
        text, sender = ic.recv(timeout)
        print(f"{sender} {text}")

    _run(action)


@cli.command()
@click.argument("sender")
@click.argument("text")
def reply(sender, text):
    """Answer SENDER (NODE/RANK, as recv printed it) with TEXT."""
    _run(lambda ic: ic.reply(sender, text))


def main() -> None:
    cli(prog_name="cmintercom")
