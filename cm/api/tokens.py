"""HTTP API tokens: one per user, derived from the head's secret, stored only as a hash.

A user's token is HMAC(secret, "uid:generation"), so asking for it again
(`cmtoken`) gives the same working token without the head keeping it in
clear; the database holds its SHA-256 only. Revoking bumps the user's
generation and drops the hash: the old token matches nothing any more, and
the next `cmtoken` derives a new one. The secret is RUN_DIR/api-token.key
(0600, made by the head on first use).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cm import store

SECRET_FILE = "api-token.key"
PREFIX = "cm1_"


def _secret(run_dir: str | Path) -> bytes:
    path = Path(run_dir) / SECRET_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def digest(token: str) -> str:
    """What the database stores of a token."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def derive(secret: bytes, uid: int, generation: int) -> str:
    mac = hmac.new(secret, f"{uid}:{generation}".encode(), "sha256").digest()
    return PREFIX + base64.urlsafe_b64encode(mac).decode().rstrip("=")


def issue(run_dir: str | Path, uid: int, user: str) -> str:
    """The user's current token (the same one each time until it is revoked)."""
    record = store.token_record(uid) or {}
    generation = int(record.get("generation", 0))
    token = derive(_secret(run_dir), uid, generation)
    if record.get("hash") != digest(token) or record.get("user") != user:
        store.set_token(uid, user, generation, digest(token))
    return token


def revoke(uid: int, user: str) -> None:
    """Make the user's token stop working; the next issue() gives a new one."""
    record = store.token_record(uid) or {}
    store.set_token(uid, user, int(record.get("generation", 0)) + 1, None)


def owner(token: str) -> int | None:
    """The uid a presented token belongs to, or None (unknown, revoked, or not a token at all)."""
    if not token.startswith(PREFIX) or len(token) > 100:
        return None
    record = store.token_owner(digest(token))
    return None if record is None else int(record["_id"])
