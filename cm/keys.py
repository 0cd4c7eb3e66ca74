"""CurveZMQ keys for the daemon links, kept in RUN_DIR/keys.

Layout: ``head.key``/``head.key_secret`` for the head; ``<node>.key_secret``
(or the shared ``node.key_secret``) for compute nodes; ``authorized/`` holds
the public key of every node the head accepts. An unknown key is refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import zmq
import zmq.auth


class KeysMissing(RuntimeError):
    pass


def keys_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "keys"


def ensure_keys(run_dir: str | Path, names: list[str] = ("node",)) -> Path:
    """Create the head's keys and one keypair per name, authorising each. Idempotent."""
    kdir = keys_dir(run_dir)
    authorized = kdir / "authorized"
    authorized.mkdir(parents=True, exist_ok=True)
    kdir.chmod(0o700)
    for name in ["head", *names]:
        if not (kdir / f"{name}.key_secret").exists():
            zmq.auth.create_certificates(str(kdir), name)
        if name != "head" and not (authorized / f"{name}.key").exists():
            shutil.copy(kdir / f"{name}.key", authorized / f"{name}.key")
    return kdir


def head_keys(run_dir: str | Path) -> tuple[bytes, bytes]:
    path = keys_dir(run_dir) / "head.key_secret"
    if not path.exists():
        raise KeysMissing(f"no head key at {path}: run `make setup` or `cmdaemon keys`")
    public, secret = zmq.auth.load_certificate(str(path))
    return public, secret


def head_public(run_dir: str | Path) -> bytes:
    path = keys_dir(run_dir) / "head.key"
    if not path.exists():
        raise KeysMissing(f"no head public key at {path}")
    public, _ = zmq.auth.load_certificate(str(path))
    return public


def node_keys(run_dir: str | Path, name: str) -> tuple[bytes, bytes]:
    kdir = keys_dir(run_dir)
    for candidate in (kdir / f"{name}.key_secret", kdir / "node.key_secret"):
        if candidate.exists():
            public, secret = zmq.auth.load_certificate(str(candidate))
            return public, secret
    raise KeysMissing(f"no key for node {name} in {kdir}")


class Gatekeeper:
    """The head's ZAP handler: only the public keys in keys/authorized/ may connect.

    Without a ZAP handler libzmq lets any CURVE client in, so the head runs
    this before binding. `refresh()` rereads the folder when it changed, so a
    node added later is let in without a restart.
    """

    def __init__(self, ctx: zmq.Context, run_dir: str | Path):
        from zmq.auth.thread import ThreadAuthenticator

        self.authorized = keys_dir(run_dir) / "authorized"
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.seen = -1.0
        self.refresh()

    def refresh(self) -> None:
        try:
            mtime = self.authorized.stat().st_mtime
        except OSError:
            mtime = 0.0
        if mtime != self.seen:
            self.seen = mtime
            self.auth.configure_curve(domain="*", location=str(self.authorized))

    def stop(self) -> None:
        self.auth.stop()


def secure_server(sock: zmq.Socket, run_dir: str | Path) -> None:
    public, secret = head_keys(run_dir)
    sock.curve_publickey, sock.curve_secretkey, sock.curve_server = public, secret, True


def secure_client(sock: zmq.Socket, run_dir: str | Path, name: str) -> None:
    public, secret = node_keys(run_dir, name)
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_serverkey = head_public(run_dir)
