"""The web page's sessions: a random id in an HttpOnly, SameSite=Strict cookie, everything else at the head.

Logging in with an API token (``cmtoken``) makes a session: its id (32
random bytes) is the cookie, and the token stays in the head's memory, so
no script, no other page and no copy of the browser's cookie jar holds the
token. Each request of the session checks the token again (the API's own
check, cached for at most TOKEN_CACHE_SECONDS), so revoking it ends the
session too. Each session has its own CSRF token, which every form posts
back; a session ends on logout, after LIFETIME, or when its token expires.
Sessions live in the head's memory: a restart of the head logs everyone out.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

COOKIE = "cm_session"
LOGIN_COOKIE = "cm_login"  # the login form's own CSRF token (no session yet)
LIFETIME = 8 * 3600.0
MAX_SESSIONS = 10000
MAX_PER_USER = 64


@dataclass
class Session:
    token: str
    uid: int
    csrf: str
    expires: float  # time.time()


class Sessions:
    def __init__(self) -> None:
        self.by_id: dict[str, Session] = {}

    def open(self, token: str, uid: int, token_expires: float = 0) -> str:
        """A new session for a checked token; its id (the cookie's value)."""
        now = time.time()
        self._expire(now)
        mine = sorted((s.expires, sid) for sid, s in self.by_id.items() if s.uid == uid)
        for _, sid in mine[:max(0, len(mine) - MAX_PER_USER + 1)]:  # a user's oldest sessions make room
            del self.by_id[sid]
        if len(self.by_id) >= MAX_SESSIONS:
            oldest = min(self.by_id.items(), key=lambda item: item[1].expires)[0]
            del self.by_id[oldest]
        expires = now + LIFETIME
        if token_expires:
            expires = min(expires, token_expires)
        sid = secrets.token_urlsafe(32)
        self.by_id[sid] = Session(token, uid, secrets.token_urlsafe(32), expires)
        return sid

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        session = self.by_id.get(sid)
        if session is None:
            return None
        if session.expires <= time.time():
            del self.by_id[sid]
            return None
        return session

    def close(self, sid: str | None) -> None:
        if sid:
            self.by_id.pop(sid, None)

    def _expire(self, now: float) -> None:
        for sid in [sid for sid, s in self.by_id.items() if s.expires <= now]:
            del self.by_id[sid]


def cookies(header: str) -> dict[str, str]:
    """A Cookie header -> {name: value} (the first of a repeated name)."""
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in out:
            out[name] = value.strip()
    return out


def set_cookie(name: str, value: str, secure: bool, max_age: float | None = None) -> str:
    """A Set-Cookie value: HttpOnly, SameSite=Strict, only for /ui, Secure over TLS."""
    parts = [f"{name}={value}", "Path=/ui", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    if max_age is not None:
        parts.append(f"Max-Age={int(max_age)}")
    return "; ".join(parts)


def same(given: str | None, expected: str) -> bool:
    """A posted CSRF token against the session's, in constant time."""
    return bool(given) and secrets.compare_digest(given.encode(), expected.encode())  # type: ignore[union-attr]
