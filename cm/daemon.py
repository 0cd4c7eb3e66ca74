"""`cmdaemon`: the one daemon every node runs, head or compute.

The daemon supervises its parts (the head loop; or the node loop and its
mover): a part that dies is logged with its traceback and restarted after a
short back-off, never silently lost.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable

from cm import config, logs
from cm.logs import event

log = logging.getLogger("cm.daemon")


class Part:
    """A supervised part: a callable run(stop) on its own thread, restarted if it dies."""

    def __init__(self, name: str, target: Callable[[threading.Event], None]):
        self.name, self.target = name, target
        self.thread: threading.Thread | None = None
        self.restarts = 0
        self.failed_at = 0.0

    def start(self, stop: threading.Event) -> None:
        self.thread = threading.Thread(target=self._run, args=(stop,), name=self.name, daemon=True)
        self.thread.start()

    def _run(self, stop: threading.Event) -> None:
        try:
            self.target(stop)
        except Exception:
            self.failed_at = time.monotonic()
            log.exception("part %s died", self.name, extra={"fields": {"part": self.name}})


class Supervisor:
    def __init__(self, parts: list[Part]):
        self.parts = parts
        self.stop = threading.Event()

    def run(self) -> int:
        for part in self.parts:
            part.start(self.stop)
        while not self.stop.wait(0.5):
            for part in self.parts:
                if part.thread is not None and not part.thread.is_alive():
                    backoff = min(10.0, 0.5 * 2 ** min(part.restarts, 5))
                    if time.monotonic() - part.failed_at < backoff:
                        continue
                    part.restarts += 1
                    event(log, "restarting part", logging.WARNING, part=part.name, restarts=part.restarts)
                    part.start(self.stop)
        for part in self.parts:
            if part.thread is not None:
                part.thread.join(timeout=30)
        return 0


def head_parts(settings: config.Settings) -> list[Part]:
    from cm.api.tls import check_binding
    from cm.head.server import HeadLoop

    check_binding(settings)  # before anything listens: a head that would take tokens in clear does not start

    def head_loop(stop: threading.Event) -> None:
        HeadLoop(settings).run(stop)

    return [Part("head", head_loop)]


def node_parts(settings: config.Settings, wakeup_fd: int | None) -> list[Part]:
    from cm.node.agent import NodeAgent
    from cm.node.mover import Mover

    mover = Mover(settings.transfer_bind, settings.transfer_port, chunk_size=settings.chunk_mb << 20,
                  log_level=settings.log_level, encrypt=settings.data_encrypt)
    mover.start()

    def mover_watch(stop: threading.Event) -> None:
        # the mover is a process of its own: a crash there is noticed here and it starts again
        while not stop.wait(0.5):
            mover.check()
        mover.stop()

    def node_loop(stop: threading.Event) -> None:
        NodeAgent(settings, transfer=mover, wakeup_fd=wakeup_fd).run(stop)

    return [Part("mover", mover_watch), Part("node", node_loop)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from cm.deploy.cli import COMMANDS

    if argv and argv[0] in COMMANDS:  # config, keys, install, uninstall, db: setting a site up (cm.deploy)
        from cm.deploy.cli import main as deploy_main

        return deploy_main(argv)
    parser = argparse.ArgumentParser(prog="cmdaemon", description="the cm daemon (head or compute node); also "
                                     f"`cmdaemon {{{','.join(COMMANDS)}}} --help` (docs/DEPLOY.md)")
    parser.add_argument("role", choices=["head", "node"], help="which daemon to run")
    parser.add_argument("--name", help="node name (CM_NODE_NAME)")
    parser.add_argument("--partition", help="partition (CM_PARTITION)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("node_name", args.name), ("partition", args.partition)) if v}
    try:
        settings = config.load(**overrides)
    except config.ConfigError as exc:
        print(f"cmdaemon: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level)
    supervisor: Supervisor
    wakeup_fd = None
    if args.role == "node":
        # SIGCHLD wakes the node loop at once, so a finished job is reported without polling delay
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        wakeup_fd = r
    try:
        parts = head_parts(settings) if args.role == "head" else node_parts(settings, wakeup_fd)
    except Exception as exc:
        event(log, "cannot start", logging.ERROR, role=args.role, error=str(exc))
        return 1
    supervisor = Supervisor(parts)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor.stop.set())
    event(log, "cmdaemon starting", role=args.role, pid=os.getpid())
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
