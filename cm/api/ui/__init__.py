"""The web page under /ui/, served by the HTTP API's thread on its TCP port and on api.sock.

Server-rendered HTML (jinja2, autoescaped: whatever a user typed shows as
text), a little JavaScript of cm's own (static/app.js: the live progress
of a sync through the API's long poll) and uPlot, vendored from npm
(static/VENDORED.md). Nothing is fetched from anywhere but the head, and a
strict Content-Security-Policy allows nothing else: no inline script, no
inline style.

Who the caller is: the user of the API token they logged in with
(cm.api.ui.sessions); on api.sock that must be the connecting user (root
may log in as anyone). Every page asks the head through the same
operations as the API and the commands (cm.head.requests), so a user sees
and may do exactly what cminfo, cmkill and cmcontrol allow: a button the
page shows or hides is presentation, the head's answer is the rule. Every
POST carries the session's CSRF token.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable
from urllib.parse import parse_qs

import msgspec

from cm.api.http import HttpError, HttpRequest, HttpResponse
from cm.api.ui import sessions
from cm.callers import Caller
from cm.protocol import ClientRequest

if TYPE_CHECKING:
    from cm.api.server import ApiServer

PREFIX = "/ui"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY"}


def is_ui(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


@dataclass
class Context:
    """One request of the page: who asks (None before login), their session, and where it came in."""

    api: "ApiServer"
    request: HttpRequest
    caller: Caller | None
    session: sessions.Session | None
    sid: str | None
    secure: bool  # over TLS: the cookie is Secure
    peer: Caller | None  # api.sock's caller, from the kernel
    form: dict[str, list[str]]

    def field(self, name: str, default: str = "") -> str:
        values = self.form.get(name)
        return values[0].strip() if values else default

    async def ask(self, kind: type[ClientRequest], args: dict[str, Any] | ClientRequest, watch: bool = False) -> Any:
        from cm.api.routes import ask

        assert self.caller is not None
        return await ask(self.api, self.caller, kind, args, self.request if watch else None)


def html(status: int, body: str, **headers: str) -> HttpResponse:
    return HttpResponse(status, body.encode(), "text/html; charset=utf-8",
                        {**HEADERS, "Cache-Control": "no-store", **headers})


def json(status: int, value: Any) -> HttpResponse:
    return HttpResponse(status, msgspec.json.encode(value), "application/json",
                        {**HEADERS, "Cache-Control": "no-store"})


def redirect(location: str, **headers: str) -> HttpResponse:
    return HttpResponse(303, b"", "text/plain", {**HEADERS, "Location": location, **headers})


async def dispatch(api: "ApiServer", peer: Caller | None, request: HttpRequest, taken: list[Hashable]) -> HttpResponse:
    from cm.api.ui import pages

    path = request.path
    if request.method == "GET" and path.startswith(PREFIX + "/static/"):
        return pages.static(path[len(PREFIX + "/static/"):])
    if request.method not in ("GET", "POST"):
        raise HttpError(405, f"the page takes GET and POST, not {request.method[:20]}")
    form: dict[str, list[str]] = {}
    if request.method == "POST":
        try:
            form = parse_qs(request.body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
        except (UnicodeDecodeError, ValueError):
            raise HttpError(400, "the form is not UTF-8 url-encoded", close=True) from None
    sid = sessions.cookies(request.headers.get("cookie", "")).get(sessions.COOKIE)
    session = api.sessions.get(sid)
    ctx = Context(api, request, None, session, sid, peer is None and api.tls is not None, peer, form)
    try:
        if session is not None:
            ctx.caller = await _caller(ctx, session)
            if peer is None:
                api.bind(ctx.caller, taken)
        return await pages.route(ctx)
    except HttpError as exc:
        if exc.close:
            raise
        if path.endswith(".json"):
            return json(exc.status, {"error": exc.message})
        if exc.status == 401:
            return redirect(f"{PREFIX}/login")
        return html(exc.status, pages.render("error.html", ctx, status=exc.status, message=exc.message))


async def _caller(ctx: Context, session: sessions.Session) -> Caller:
    """The session's user, its token checked again (revoked: the session ends)."""
    try:
        caller = await ctx.api.token_caller(session.token)
    except HttpError as exc:
        if exc.status == 401:
            ctx.api.sessions.close(ctx.sid)
        raise
    check_peer(ctx.peer, caller)
    return caller


def check_peer(peer: Caller | None, caller: Caller) -> None:
    """On api.sock the page is the connecting user's (a proxy to the socket must not lend its user to others)."""
    if peer is not None and peer.uid not in (0, caller.uid):
        raise HttpError(403, f"on the API's socket you are {peer.user}: log in with {peer.user}'s own token")


def check_csrf(ctx: Context) -> None:
    """Every POST of a session carries its CSRF token."""
    if ctx.session is None or not sessions.same(ctx.field("csrf") or None, ctx.session.csrf):
        raise HttpError(403, "this form's CSRF token is missing or wrong: reload the page and try again")


def new_login_token() -> str:
    return secrets.token_urlsafe(24)
