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
import logging
import os
import secrets
import shutil
from pathlib import Path

import zmq
import zmq.auth

from cm.logs import Sometimes

log = logging.getLogger("cm.keys")


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
NOTIFY_SECRET = "notify.key"  # signs webhook POSTs (cm.head.notify)


def data_plane_key(transfer_secret: bytes, nonce: str, transfer_id: str) -> str:
    """The key of one run of a sync (128 bits, hex), which its senders and its destination's mover share.

    Derived from the head's transfer secret (never stored anywhere else), the job's random nonce (stored
    with the job: not secret) and the run's transfer id, so each run has its own, a job id used again after
    the database was wiped gets another, and no value in the database yields it."""
    return hmac.new(transfer_secret, f"{nonce}:{transfer_id}".encode(), "sha256").hexdigest()[:32]


def head_keys(run_dir: str | Path) -> tuple[bytes, bytes]:
    path = keys_dir(run_dir) / "head.key_secret"
    if not path.exists():
        raise KeysMissing(f"no head key at {path}: run `cmdaemon keys init` (on the head) or `make setup`")
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


REFUSED_HINT = "run `cmdaemon keys export NODE` on the head and `cmdaemon keys import NODE.cmkeys` on the node"
SHARED_NODE_KEY = "node"  # the one keypair every node may use (`cmdaemon keys init node`: the compose cluster)


class Gatekeeper:
    """The head's ZAP handler: only the public keys in keys/authorized/ may connect.

    Without a ZAP handler libzmq lets any CURVE client in, so the head runs
    this before binding. `refresh()` rereads the folder when it changed, so a
    node added later is let in without a restart, and one revoked is refused
    from its next handshake. A refused key is logged (WARNING) with what to do.
    """

    def __init__(self, ctx: zmq.Context, run_dir: str | Path):
        from zmq.auth.thread import ThreadAuthenticator

        self.authorized = keys_dir(run_dir) / "authorized"
        self.owners: dict[bytes, str] = {}  # z85 public key -> node name; replaced whole, read by the ZAP thread
        self.refused = Sometimes()  # by key (logged by the ZAP thread or the head's)
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve_callback(domain="*", credentials_provider=self)
        self.seen = -1.0
        self.refresh()

    def refresh(self) -> None:
        try:
            mtime = self.authorized.stat().st_mtime
        except OSError:
            mtime = 0.0
        if mtime != self.seen:
            self.seen = mtime
            owners = {}
            try:
                for path in self.authorized.glob("*.key"):
                    owners[zmq.auth.load_certificate(str(path))[0]] = path.stem
            except (OSError, ValueError) as exc:
                log.error("cannot read the authorised node keys in %s: %s", self.authorized, exc)
            self.owners = owners

    def speaks_for(self, user_id: str | None, node: str) -> bool:
        """May the connection whose ZAP User-Id (its z85 key) is user_id speak as node? Its key must be that
        node's (or the shared ``node`` key), and still authorised: a key revoked meanwhile is cut off here."""
        key = (user_id or "").encode()
        if self.owners.get(key) in (node, SHARED_NODE_KEY):
            return True
        self._refused(key, f"dropped messages of a connection speaking as node {node!r} with a key that is not "
                           f"its own or was revoked: {REFUSED_HINT}")
        return False

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: is this client's public key (z85) authorised?"""
        if key in self.owners:
            return True
        self._refused(key, f"refused a node whose CurveZMQ key is not authorised: {REFUSED_HINT}; "
                           "a node revoked with `cmdaemon keys revoke` stays refused")
        return False

    def _refused(self, key: bytes, message: str) -> None:
        if self.refused.due(key):
            log.warning("%s (public key %s)", message, key.decode(), extra={"fields": {"public_key": key.decode()}})

    def stop(self) -> None:
        self.auth.stop()


def secure_server(sock: zmq.Socket, run_dir: str | Path) -> None:
    public, secret = head_keys(run_dir)
    sock.curve_publickey, sock.curve_secretkey, sock.curve_server = public, secret, True


def secure_client(sock: zmq.Socket, run_dir: str | Path, name: str) -> None:
    public, secret = node_keys(run_dir, name)
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_serverkey = head_public(run_dir)
