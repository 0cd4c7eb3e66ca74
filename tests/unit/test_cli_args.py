"""cm.cli.args reads a command line without click only where it reads it exactly as click does.

Every command built on it is checked against its own click command: for any command line, the fast parse
gives click's parameters, or gives way (None) and click decides. And the lines users type every day are
read without click, or the commands would not be fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm.cli import cmacct, cminfo, cmkill, cmrun, cmsync, cmtoken
from cm.cli.args import Command, Param
from cm.cli.cmsync import parse_rate

COMMANDS = {c.prog: c for c in (cmacct.cli, cminfo.cli, cmkill.cli, cmrun.cli, cmsync.cli, cmtoken.cli)}


def clicks(command: Command, argv: list[str]):
    """click's parameters for argv, or the exception it stops with (a usage error, --help's exit)."""
    try:
        with command.click().make_context(command.prog, list(argv)) as ctx:
            return ctx.params
    except (click.exceptions.ClickException, click.exceptions.Exit) as exc:
        return exc


def tokens_for(command: Command) -> st.SearchStrategy[str]:
    switches = sorted(command.options)
    values = ["0", "1", "2", "-1", "10", " 3", "x", "", "tcp", "rdma", "round-robin", "size-balanced", "5M", "0.5",
              "10Q", "1:00", "a=b", "=", "k=", "gpu:/a", "cpu:/b", "ls", "-", "--", "-h", "--help", "-n3", "-xyz"]
    eq = [f"{s}={v}" for s in switches if s.startswith("--") for v in ("1", "tcp", "", "a=b", "5M")]
    return st.sampled_from(switches + values + eq) | st.text(max_size=4)


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_the_fast_parse_is_clicks_or_gives_way(prog, capsys):
    command = COMMANDS[prog]

    @settings(max_examples=400, deadline=None)
    @given(st.lists(tokens_for(command), max_size=7))
    def agree(argv):
        fast = command.parse(argv)
        slow = clicks(command, argv)
        if fast is not None:
            assert not isinstance(slow, Exception), (argv, fast, slow)
            assert fast == slow, argv

    agree()
    capsys.readouterr()  # --help's output


EVERYDAY = {
    "cminfo": [[], ["42"], ["--all"], ["--json"], ["--label", "a=b", "--label=c=d"]],
    "cmkill": [["42"], ["1", "2", "3"]],
    "cmrun": [["hostname"], ["-n", "2", "-p", "4", "--wait", "--", "sh", "-c", "echo hi"], ["--parsable", "-t", "5",
              "-J", "x", "--mem=100", "ls", "-l", "--help"], ["--hold", "--label", "k=v", "sleep", "60"],
              ["--notify", "https://h/x", "--notify-on", "begin,end", "true"]],
    "cmsync": [["gpu:/a", "cpu:/b"], ["--wait", "-n", "2", "--delete", "--exclude", "*.tmp", "gpu:/a", "cpu:/b"],
               ["gpu:/a", "cpu:/b", "--bwlimit", "10M", "--transport=tcp", "--policy", "round-robin", "--checksum"]],
    "cmtoken": [[], ["--revoke", "alice"]],
    "cmacct": [[], ["-S", "2026-12-01", "-E", "now", "--allusers"], ["-u", "bob", "-s", "F,CD", "--parsable",
               "--format=JobID,State,Bytes"], ["--json", "--label", "a=b", "--name", "x"]],
}


@pytest.mark.parametrize("prog", sorted(EVERYDAY))
def test_everyday_command_lines_are_read_without_click(prog):
    command = COMMANDS[prog]
    for argv in EVERYDAY[prog]:
        fast = command.parse(argv)
        assert fast is not None, argv
        assert fast == clicks(command, argv)


def test_what_click_must_read_is_left_to_it():
    sync = COMMANDS["cmsync"]
    for argv in (["--help"], ["-h"], ["gpu:/a"], ["gpu:/a", "cpu:/b", "extra"], ["-n", "0", "a", "b"],
                 ["--bwlimit", "fast", "a", "b"], ["--transport", "udp", "a", "b"], ["--wait=yes", "a", "b"],
                 ["--nodes"], ["--no-such-option", "a", "b"], ["-n2", "a", "b"]):
        assert sync.parse(argv) is None, argv
        assert isinstance(clicks(sync, argv), Exception) or argv == ["-n2", "a", "b"], argv
    assert sync.parse(["--bwlimit", "10M", "a", "b"])["bwlimit"] == 10 * 1024 * 1024
    assert COMMANDS["cmrun"].parse(["-n", "2", "ls", "-n", "3"])["command"] == ("ls", "-n", "3")  # not interspersed


def test_shell_completion_is_clicks(tmp_path):
    """click completes from its own main(): with its variable set, even a line the fast parse reads (none
    at all) goes to click, which prints the shell's completion script instead of running the command."""
    env = {**os.environ, "_CMINFO_COMPLETE": "bash_source", "CM_RUN_DIR": str(tmp_path)}  # no head there
    proc = subprocess.run([str(Path(sys.executable).parent / "cminfo")], capture_output=True, text=True, env=env,
                          timeout=30)
    assert proc.returncode == 0 and "complete -o nosort -F" in proc.stdout and not proc.stderr


def test_rates_and_what_the_declarations_refuse():
    assert parse_rate("") is None and parse_rate(" 10M ") == 10 << 20 and parse_rate("500") == 500 << 10
    for bad in ("0", "fast", "1" * 400, "0.0001B"):
        with pytest.raises(ValueError, match="is not a rate"):
            parse_rate(bad)
    assert COMMANDS["cmsync"].parse(["--bwlimit", "", "a", "b"])["bwlimit"] is None
    assert COMMANDS["cmsync"].parse(["--bwlimit", "1" * 400, "a", "b"]) is None  # click says what is wrong
    for attrs in ({"count": True}, {"flag_value": "x"}, {"nargs": 2}, {"envvar": "X"}, {"type": int, "default": "5"},
                  {"type": click.Path()}):
        with pytest.raises(TypeError):
            Param("option", ("--x",), attrs)
