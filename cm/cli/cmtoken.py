"""cmtoken: print your HTTP API token (the same one each time, or one with a lifetime), or revoke a user's (admins)."""

from __future__ import annotations

import os
import re
import sys

from cm.cli.args import command, option
from cm.cli.client import Client, fail, run_command

UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_lifetime(text: str) -> float:
    """'8h', '30m', '2d', '90s' or '90' (seconds) -> seconds; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"--lifetime {text!r}: give a duration such as 90s, 30m, 8h or 2d")
    return float(match.group(1)) * UNITS[match.group(2)]


def instructions(token: str) -> str:
    """How to use the token with curl against this head's TCP port (its certificate, its address)."""
    from cm import config
    from cm.api.tls import cert_paths

    settings = config.load()
    if not settings.api_port:
        return "the HTTP API has no TCP port here (CM_API_PORT is 0): use RUN_DIR/api.sock, which needs no token"
    host = settings.api_host if settings.api_host not in ("0.0.0.0", "::", "") else settings.head_host
    if not settings.api_tls:
        return f"use it with: curl -H 'Authorization: Bearer {token}' http://{host}:{settings.api_port}/v1/jobs"
    cert = cert_paths(settings)[0]
    return (f"use it with: curl --cacert {cert} -H 'Authorization: Bearer {token}' "
            f"https://{host}:{settings.api_port}/v1/jobs")


@command("cmtoken")
@option("--lifetime", default=None, metavar="DURATION",
        help="a token that stops working after DURATION (90s, 30m, 8h, 2d); without: the same one each time")
@option("--revoke", "user", default=None, metavar="USER",
        help="make every token of USER stop working (admins; anyone may revoke their own)")
@option("--token", default=lambda: os.environ.get("CM_OPERATOR_TOKEN", ""), hidden=True)
def cli(lifetime, user, token):
    """Print the token that authenticates you on the HTTP API's TCP port (Authorization: Bearer TOKEN)."""

    def body() -> None:
        if user is None:
            try:
                seconds = parse_lifetime(lifetime) if lifetime is not None else 0
            except ValueError as exc:
                fail("cmtoken", str(exc), 2)
            issued = Client().call("token", lifetime=seconds)["token"]
            print(issued, flush=True)
            if sys.stderr.isatty():
                print(instructions(issued), file=sys.stderr)
        else:
            Client().call("token", revoke=user, token=token)
            print(f"revoked {user}'s tokens")

    run_command("cmtoken", body)


def main() -> None:
    cli.main()
