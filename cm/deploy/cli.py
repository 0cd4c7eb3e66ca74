"""The admin commands of `cmdaemon` (docs/DEPLOY.md): config, keys, install, uninstall, db."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cm import config
from cm.config_sources import config_file

COMMANDS = ("config", "keys", "install", "uninstall", "db")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmdaemon", description="set cm up on a site's machines (docs/DEPLOY.md)")
    sub = parser.add_subparsers(dest="command", required=True)
    cfg = sub.add_parser("config", help="the configuration file")
    cfg.add_argument("--example", action="store_true", required=True,
                     help="print a complete, commented /etc/cm/cm.toml")
    keys = sub.add_parser("keys", help="CurveZMQ keys: init on the head, export for nodes, import on a node")
    ksub = keys.add_subparsers(dest="action", required=True)
    init = ksub.add_parser("init", help="the head's keypair and secrets (kept if present)")
    init.add_argument("--force", action="store_true", help="make new ones (every node must import again)")
    init.add_argument("nodes", nargs="*", help="also keypairs kept here for these nodes (a shared run dir)")
    export = ksub.add_parser("export", help="one file per node (0600) with what it needs, to copy to it")
    export.add_argument("nodes", nargs="+")
    export.add_argument("--out", type=Path, default=Path("."), help="directory to write NODE.cmkeys in")
    imp = ksub.add_parser("import", help="install a file `keys export` wrote, on its node")
    imp.add_argument("file", type=Path)
    revoke = ksub.add_parser("revoke", help="the head hears this node's key no more")
    revoke.add_argument("node")
    for name in ("install", "uninstall"):
        p = sub.add_parser(name, help=f"{name} a systemd unit (cm-ROLE.service)")
        p.add_argument("--role", choices=("head", "node", "db"), required=True)
        p.add_argument("--prefix", type=Path, default=Path("/"), help="write under this root instead of /")
    sub.add_parser("db", help="run the embedded database server in the foreground on DB_DIR/db.sock")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = config.load()
    except config.ConfigError as exc:
        print(f"cmdaemon: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, settings)
    except (OSError, RuntimeError) as exc:
        print(f"cmdaemon {args.command}: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, settings: config.Settings) -> int:
    if args.command == "config":
        from cm.deploy.example import example

        sys.stdout.write(example())
        return 0
    if args.command == "keys":
        return _keys(args, settings)
    if args.command in ("install", "uninstall"):
        from cm.deploy import units

        if args.command == "install":
            said = units.install(args.role, args.prefix, os.path.abspath(config_file(os.environ)))
        else:
            said = units.uninstall(args.role, args.prefix)
        print("\n".join(said))
        return 0
    return _db(settings)


def _keys(args: argparse.Namespace, settings: config.Settings) -> int:
    from cm.deploy import keys_cli

    if args.action == "init":
        print("\n".join(keys_cli.init(settings.run_dir, args.force, args.nodes)))
    elif args.action == "export":
        for path in keys_cli.export(settings.run_dir, args.nodes, args.out):
            print(f"wrote {path}: copy it to node {path.stem} and run `cmdaemon keys import {path.name}` there")
    elif args.action == "import":
        for path in keys_cli.import_(settings.run_dir, args.file, settings.name):
            print(f"installed {path}")
    else:
        path = keys_cli.revoke(settings.run_dir, args.node)
        print(f"revoked {args.node}: removed {path}; the head hears that key no more and refuses its next connection")
    return 0


def _db(settings: config.Settings) -> int:
    from cm.cluster import db

    try:
        plan = db.ferretdb_plan({"CM_FERRETDB_BIN": settings.ferretdb_bin}) if settings.ferretdb_bin else \
            db.server_plan()
    except db.DatabaseUnavailable as exc:
        if settings.ferretdb_bin or db.EMBEDDED_BIN.parent.parent.parent.joinpath("Makefile").exists():
            print(f"cmdaemon db: {exc}", file=sys.stderr)  # a checkout's: `make setup` builds it
        else:
            print("cmdaemon db: no database server here: set ferretdb_bin in cm.toml to a cm-ferretdb binary "
                  "(built in a cm checkout by `make setup`, which needs Go: copy its .build/bin/cm-ferretdb here), "
                  "or put mongod on PATH, or give the head a site MongoDB (db_uri_file)", file=sys.stderr)
        return 1
    return db.serve(plan, Path(settings.db_dir))
