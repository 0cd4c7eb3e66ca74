"""cmtoken: print your HTTP API token (the same one each time), or revoke a user's (admins)."""

from __future__ import annotations

import os

from cm.cli.args import command, option
from cm.cli.client import Client, run_command


@command("cmtoken")
@option("--revoke", "user", default=None, metavar="USER",
        help="make USER's token stop working (admins; anyone may revoke their own)")
@option("--token", default=lambda: os.environ.get("CM_OPERATOR_TOKEN", ""), hidden=True)
def cli(user, token):
    """Print the token that authenticates you on the HTTP API's TCP port (Authorization: Bearer TOKEN)."""

    def body() -> None:
        if user is None:
            print(Client().call("token")["token"])
        else:
            Client().call("token", revoke=user, token=token)
            print(f"revoked {user}'s token")

    run_command("cmtoken", body)


def main() -> None:
    cli.main()
