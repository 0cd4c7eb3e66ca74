"""HTTP API tokens: signed by the head's secret, checked against it; the database holds no token at all.

A token is ``cm2_UID.GENERATION.EXPIRES.MAC`` with MAC = HMAC-SHA256(secret,
"UID:GENERATION:EXPIRES"); EXPIRES is a Unix time, or 0 for a token without
a lifetime (`cmtoken` gives the same one each time until it is revoked;
`cmtoken --lifetime 8h` a new one each time that stops working after 8 h).
Only the head, which holds the secret (RUN_DIR/keys/api-token.key, 0600 in
the 0700 keys folder), can make one: the database keeps only each user's
generation, so neither a dump of it nor a record written into it yields a
working token. Revoking bumps the user's generation: every token made before
stops matching.
"""

from __future__ import annotations

import base64
import hmac
import time
from pathlib import Path

from cm import store
from cm.keys import secret

SECRET_FILE = "api-token.key"
PREFIX = "cm2_"
MAX_LENGTH = 100


def _secret(run_dir: str | Path) -> bytes:
    return secret(run_dir, SECRET_FILE)


def _mac(secret: bytes, uid: int, generation: int, expires: int) -> str:
    mac = hmac.new(secret, f"{uid}:{generation}:{expires}".encode(), "sha256").digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def derive(secret: bytes, uid: int, generation: int, expires: int = 0) -> str:
    return f"{PREFIX}{uid}.{generation}.{expires}.{_mac(secret, uid, generation, expires)}"


def _generation(uid: int) -> int:
    record = store.token_record(uid) or {}
    return int(record.get("generation", 0))


def issue(run_dir: str | Path, uid: int, user: str, lifetime: float = 0) -> str:
    """The user's token: without a lifetime the same one each time until it is revoked; with one, a token
    that stops working `lifetime` seconds from now."""
    expires = int(time.time() + lifetime) if lifetime > 0 else 0
    return derive(_secret(run_dir), uid, _generation(uid), expires)


def revoke(uid: int, user: str) -> None:
    """Make every token of the user stop working; the next issue() gives a new one."""
    store.set_token(uid, user, _generation(uid) + 1)


def owner(run_dir: str | Path, token: str, now: float | None = None) -> int | None:
    """The uid a presented token belongs to, or None (not signed by this head, expired, revoked, malformed)."""
    if not token.startswith(PREFIX) or len(token) > MAX_LENGTH:
        return None
    fields = token[len(PREFIX):].split(".")
    if len(fields) != 4 or not all(f.isdigit() for f in fields[:3]):
        return None
    uid, generation, expires = (int(f) for f in fields[:3])
    if not hmac.compare_digest(fields[3], _mac(_secret(run_dir), uid, generation, expires)):
        return None
    if expires and expires <= (time.time() if now is None else now):
        return None
    if generation != _generation(uid):
        return None
    return uid


def expires_of(token: str) -> int:
    """When a well-formed token stops working (Unix time; 0: never)."""
    fields = token[len(PREFIX):].split(".")
    return int(fields[2]) if len(fields) == 4 and fields[2].isdigit() else 0
