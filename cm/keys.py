"""The head's keys and secrets, kept in RUN_DIR/keys (0700: root's alone).

Layout: ``head.key``/``head.key_secret`` for the head; ``<node>.key_secret``
(or the shared ``node.key_secret``) for compute nodes; ``authorized/`` holds
the public key of every node the head accepts. An unknown key is refused.
Secrets only the head reads: ``api-token.key`` (cm.api.tokens signs API
tokens with it), ``transfer.key`` (every sync run's data-plane key is derived
from it, data_plane_key()), ``api.key`` (the API's TLS key, cm.api.tls).
None of them is in the database, so a dump of it opens nothing.
"""

from __future__ import annotations

import hmac
import os
import secrets
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


def secret(run_dir: str | Path, name: str) -> bytes:
    """The 32-byte secret RUN_DIR/keys/<name>, made (0600) the first time it is asked for."""
    kdir = keys_dir(run_dir)
    path = kdir / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    kdir.mkdir(parents=True, exist_ok=True)
    kdir.chmod(0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:  # made meanwhile by another thread or process
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path.read_bytes()


TRANSFER_SECRET = "transfer.key"


def data_plane_key(transfer_secret: bytes, nonce: str, transfer_id: str) -> str:
    """The key of one run of a sync (128 bits, hex), which its senders and its destination's mover share.

    Derived from the head's transfer secret (never stored anywhere else), the job's random nonce (stored
    with the job: not secret) and the run's transfer id, so each run has its own, a job id used again after
    the database was wiped gets another, and no value in the database yields it."""
    return hmac.new(transfer_secret, f"{nonce}:{transfer_id}".encode(), "sha256").hexdigest()[:32]


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
