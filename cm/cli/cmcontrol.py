"""cmcontrol: hold/release jobs, and admin operations, like scontrol."""

from __future__ import annotations

import json
import os

import click

from cm.cli.args import run_as_program
from cm.cli.client import Client, run_command

_token = click.option("--token", default=lambda: os.environ.get("CM_OPERATOR_TOKEN", ""), hidden=True)


def _call(**args) -> None:
    run_command("cmcontrol", lambda: print(json.dumps(Client().call("control", **args))))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Hold and release jobs; set priorities, drain nodes, block users (admins)."""


@cli.command()
@click.argument("job_id", type=int)
def hold(job_id):
    """Keep a pending job from starting."""
    _call(action="hold", job_id=job_id)


@cli.command()
@click.argument("job_id", type=int)
def release(job_id):
    """Let a held job start."""
    _call(action="release", job_id=job_id)


@cli.command()
@click.argument("job_id", type=int)
@click.argument("value")
@_token
def priority(job_id, value, token):
    """Set a job's priority: high, normal, low or an integer (admin)."""
    _call(action="priority", job_id=job_id, value=int(value) if value.lstrip("-").isdigit() else value, token=token)


@cli.command()
@click.argument("node")
@click.option("--reason", default="")
@_token
def drain(node, reason, token):
    """Let running jobs finish on NODE and start no new ones (admin)."""
    _call(action="drain", node=node, reason=reason, token=token)


@cli.command()
@click.argument("node")
@_token
def resume(node, token):
    """Put a drained node back in service (admin)."""
    _call(action="resume", node=node, token=token)


@cli.command()
@click.argument("user", default="ALL")
@_token
def block(user, token):
    """Refuse new jobs from USER, or from everyone (admin)."""
    _call(action="block", user=user, token=token)


@cli.command()
@click.argument("user", default="ALL")
@_token
def unblock(user, token):
    """Accept jobs from USER (or everyone) again (admin)."""
    _call(action="unblock", user=user, token=token)


def main() -> None:
    run_as_program(lambda: cli(prog_name="cmcontrol"))
