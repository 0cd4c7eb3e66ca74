"""The web page's pages: what each asks the head, and the template that shows it.

Every question goes to the head as the commands' own operations (info,
files, submit, cancel, control, metrics), as the logged-in user; the
history reads the database from the API's thread (cm.store.job_history),
not from the head's loop.
"""

from __future__ import annotations

import re
import time
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlencode

import jinja2
import msgspec

from cm.api import routes, types
from cm.api.http import HttpError, HttpResponse
from cm.api.ui import HEADERS, Context, check_csrf, check_peer, history, html, json, new_login_token, redirect, sessions
from cm.api.views import FINAL
from cm.protocol import MAX_WAIT, Cancel, Control, Files, Info, Metrics, Submit, Wait
from cm.states import JobState

HERE = Path(__file__).parent
JOB = re.compile(r"/ui/jobs/(\d{1,18})")
JOB_JSON = re.compile(r"/ui/jobs/(\d{1,18})\.json")
JOB_ACTION = re.compile(r"/ui/jobs/(\d{1,18})/(cancel|hold|release|priority)")
NODE_ACTION = "/ui/nodes/drain"  # the form's button says drain or resume
USER_ACTION = re.compile(r"/ui/users/(block|unblock)")
MAX_ROWS = 500  # jobs one listing shows, the newest (the filters narrow it)
FILES_PAGE = 200
STATES = tuple(s.value for s in JobState)


def _size(n: float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else ""


ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                         undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
ENV.filters.update(size=_size, duration=_duration, when=_when)


def render(template: str, ctx: Context, **values: Any) -> str:
    return ENV.get_template(template).render(
        caller=ctx.caller, csrf=ctx.session.csrf if ctx.session and ctx.caller else "", **values)


# --- static files: read once, served from memory --------------------------------------------------------------

TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".md": "text/plain; charset=utf-8",
         ".LICENSE": "text/plain; charset=utf-8"}
STATIC = {p.name: (p.read_bytes(), TYPES[p.suffix]) for p in (HERE / "static").iterdir() if p.suffix in TYPES}


def static(name: str) -> HttpResponse:
    found = STATIC.get(name)
    if found is None:
        raise HttpError(404, f"no static file {name[:100]!r}")
    body, kind = found
    return HttpResponse(200, body, kind, {**HEADERS, "Cache-Control": "public, max-age=3600"})


# --- routing -------------------------------------------------------------------------------------------------------


async def route(ctx: Context) -> HttpResponse:
    method, path = ctx.request.method, ctx.request.path.rstrip("/") or "/"
    if path == "/ui/login":
        return await login(ctx) if method == "POST" else login_form(ctx)
    if ctx.caller is None:
        raise HttpError(401, "log in first")
    if method == "POST":
        check_csrf(ctx)
        if path == "/ui/logout":
            ctx.api.sessions.close(ctx.sid)
            return redirect("/ui/login", **{"Set-Cookie": sessions.set_cookie(sessions.COOKIE, "", ctx.secure, 0)})
        if path == "/ui/submit":
            return await submit(ctx)
        if (m := JOB_ACTION.fullmatch(path)):
            return await job_action(ctx, int(m[1]), m[2])
        if path == NODE_ACTION:
            action = ctx.field("action", "drain")
            if action not in ("drain", "resume"):
                raise HttpError(400, "the node form's action is drain or resume")
            await ctx.ask(Control, types.admin_request(action, types.AdminRequest(node=ctx.field("node"),
                                                                                 reason=ctx.field("reason"))))
            return redirect("/ui/")
        if (m := USER_ACTION.fullmatch(path)):
            await ctx.ask(Control, types.admin_request(m[1], types.AdminRequest(user=ctx.field("user"))))
            return redirect("/ui/")
        raise HttpError(404, f"no form at {path[:200]}")
    if path == "/ui":
        return html(200, render("cluster.html", ctx, **await cluster(ctx)))
    if path == "/ui/rates.json":
        return json(200, (await cluster(ctx))["rates"])
    if path == "/ui/jobs":
        return await jobs(ctx)
    if (m := JOB_JSON.fullmatch(path)):
        return await job_json(ctx, int(m[1]))
    if (m := JOB.fullmatch(path)):
        return await job(ctx, int(m[1]))
    if path == "/ui/submit":  # prefilled from the query: "run it for real" after a dry run
        values: dict[str, Any] = {k: _query(ctx, k) for k in ("src", "dst", "nodes", "name")}
        values.update(cwd=_query(ctx, "cwd") or _home(ctx.caller.uid), delete=bool(_query(ctx, "delete")))
        return html(200, render("submit.html", ctx, values=values, error=""))
    if path == "/ui/history":
        return await history_page(ctx)
    raise HttpError(404, f"no page {path[:200]}")


# --- login ---------------------------------------------------------------------------------------------------------


def login_form(ctx: Context, status: int = 200, error: str = "") -> HttpResponse:
    token = new_login_token()
    return html(status, render("login.html", ctx, login_csrf=token, error=error),
                **{"Set-Cookie": sessions.set_cookie(sessions.LOGIN_COOKIE, token, ctx.secure, 3600)})


async def login(ctx: Context) -> HttpResponse:
    expected = sessions.cookies(ctx.request.headers.get("cookie", "")).get(sessions.LOGIN_COOKIE, "")
    if not expected or not sessions.same(ctx.field("login_csrf") or None, expected):
        return login_form(ctx, 403, "the login form's CSRF token is missing or wrong: try again")
    token = ctx.field("token")
    try:
        caller = await ctx.api.token_caller(token) if token else None
    except HttpError as exc:
        if exc.status != 401:
            raise
        caller = None
    if caller is None:
        return login_form(ctx, 401, "unknown, expired or revoked token: `cmtoken` on the head node prints yours")
    check_peer(ctx.peer, caller)
    from cm.api.tokens import expires_of

    ctx.api.sessions.close(ctx.sid)
    sid = ctx.api.sessions.open(token, caller.uid, expires_of(token))
    return redirect("/ui/", **{"Set-Cookie": sessions.set_cookie(sessions.COOKIE, sid, ctx.secure)})


# --- the cluster -------------------------------------------------------------------------------------------------


async def cluster(ctx: Context) -> dict[str, Any]:
    """Partitions and nodes, jobs by state (the head's counters), the running syncs' rates by partition pair."""
    info = await ctx.ask(Info, {"state": ["RUNNING"]})
    counts = (await ctx.ask(Metrics, {}))["jobs"]
    where = {n.name: n.partition for n in info.nodes}
    partitions: dict[str, dict[str, Any]] = {}
    for n in info.nodes:
        p = partitions.setdefault(n.partition, {"nodes": 0, "states": {}, "cpus": 0, "cpus_used": 0, "mem_mb": 0,
                                                "mem_used_mb": 0})
        p["nodes"] += 1
        p["states"][n.state] = p["states"].get(n.state, 0) + 1
        p["cpus"] += n.cpus
        p["cpus_used"] += n.cpus - n.cpus_free
        p["mem_mb"] += n.mem_mb
        p["mem_used_mb"] += n.mem_mb - n.mem_free_mb
    rates: dict[str, dict[str, float]] = {}
    for j in info.jobs:
        if j.type == "sync" and j.transfer is not None:
            pair = f"{j.partition} → {where.get(j.dst or '', j.dst)}"
            r = rates.setdefault(pair, {"rate": 0.0, "syncs": 0})
            r["rate"] += j.transfer.rate
            r["syncs"] += 1
    return {"partitions": dict(sorted(partitions.items())), "nodes": info.nodes, "rates": dict(sorted(rates.items())),
            "counts": {s: c for s, c in counts.items() if c}}


# --- jobs ----------------------------------------------------------------------------------------------------------


def _query(ctx: Context, name: str) -> str:
    values = ctx.request.query.get(name) or [""]
    return values[0].strip()[:200]


def may_cancel(ctx: Context, view: Any) -> bool:
    """Whether to show a cancel button: the head's rule (cm.head.requests._own) decides when it is pressed."""
    assert ctx.caller is not None
    return view.state not in FINAL and (ctx.caller.operator or view.user == ctx.caller.user)


async def jobs(ctx: Context) -> HttpResponse:
    state, user, label, kind = (_query(ctx, n) for n in ("state", "user", "label", "type"))
    everything = _query(ctx, "all") in ("1", "true", "yes", "on")
    args = {"all": everything, "state": [state.upper()] if state else [], "user": user or None,
            "label": [label] if label else []}
    found = [j for j in (await ctx.ask(Info, args)).jobs if not kind or j.type == kind]
    found.sort(key=lambda j: -j.id)
    return html(200, render("jobs.html", ctx, jobs=found[:MAX_ROWS], total=len(found), states=STATES,
                            filters={"state": state.upper(), "user": user, "label": label, "type": kind,
                                     "all": everything}, may_cancel=lambda j: may_cancel(ctx, j)))


def _eta(view: Any) -> float | None:
    """Seconds left at the rate so far (bytes done over time running: steadier than the nodes' last rate)."""
    t = view.transfer
    if t is None or view.state in FINAL or not t.bytes_done or not t.bytes_total or not view.elapsed:
        return None
    return max(0.0, (t.bytes_total - t.bytes_done) * view.elapsed / t.bytes_done)


def live(view: Any) -> dict[str, Any]:
    """What the job page's script updates: state, progress, rate, ETA (the .json long poll answers with it)."""
    t = view.transfer
    return {"id": view.id, "state": view.state, "final": view.state in FINAL, "progress": view.progress,
            "rate": t.rate if t else None, "bytes_done": t.bytes_done if t else None,
            "bytes_total": t.bytes_total if t else None, "files_done": t.files_done if t else None,
            "files_total": t.files_total if t else None, "eta": _eta(view), "reason": view.reason,
            "now": time.time()}


async def job(ctx: Context, job_id: int) -> HttpResponse:
    view = (await ctx.ask(Info, {"job_id": job_id})).jobs[0]
    report, report_error, after = [], "", None
    action = _query(ctx, "action")
    offset = _query(ctx, "offset")
    if view.type == "sync":
        args: dict[str, Any] = {"job_id": job_id, "offset": int(offset) if offset.isdigit() else 0,
                                "limit": FILES_PAGE}
        if action:
            args["action"] = action
        try:
            page = await ctx.ask(Files, args)
            report, after = msgspec.convert(page["files"], list[types.FileLine]), page["next"]
        except HttpError as exc:
            if exc.status in (403, 503):
                raise
            report_error = exc.message
    again = None
    if report and all(f.dry_run for f in report) and view.state in FINAL:
        again = _again(view, any(f.action == "deleted" for f in report))
    times = view.times
    history = [(what, times.get(what)) for what in ("submitted", "started", "ended") if times.get(what)]
    return html(200, render("job.html", ctx, job=view, live=live(view), eta=_eta(view), history=history,
                            report=report, report_error=report_error, after=after, action=action, again=again,
                            may_cancel=may_cancel(ctx, view), logs=f"{PurePosixPath(view.workdir or '/', 'cmlogs', str(view.id))}/",
                            live_json=msgspec.json.encode(live(view)).decode()))


def _again(view: Any, delete: bool) -> str | None:
    """The submit form's address, filled with a dry run's SRC, DST, nodes and directory (and --delete when
    the dry run would have deleted something: the view does not keep the option itself)."""
    command, dst = view.command or "", f" {view.dst}:"
    at = command.rfind(dst)
    if at < 0:
        return None
    fields = {"src": command[:at], "dst": command[at + 1:], "nodes": str(view.num_nodes or 1),
              "cwd": view.workdir or "", "name": view.name}
    if delete:
        fields["delete"] = "1"
    return "/ui/submit?" + urlencode(fields)


async def job_json(ctx: Context, job_id: int) -> HttpResponse:
    """One job's live numbers, answered when it ends or after ``wait`` seconds (the API's long poll)."""
    text = _query(ctx, "wait")
    try:
        wait = min(max(float(text), 0.0), MAX_WAIT) if text else 0.0
    except ValueError:
        raise HttpError(400, "wait must be a number of seconds") from None
    if wait > 0:
        data = await ctx.ask(Wait, {"job_id": job_id, "timeout": wait}, watch=True)
    else:
        data = await ctx.ask(Info, {"job_id": job_id})
    return json(200, live(data.jobs[0]))


async def job_action(ctx: Context, job_id: int, action: str) -> HttpResponse:
    if action == "cancel":
        result = (await ctx.ask(Cancel, {"job_ids": [job_id]}))[str(job_id)]
        if not result["ok"]:
            raise HttpError(routes.status_of(result.get("code")), result["error"])
    else:
        value: Any = None
        if action == "priority":
            text = ctx.field("value")
            value = int(text) if re.fullmatch(r"-?\d{1,9}", text) else text
        await ctx.ask(Control, types.admin_request(action, types.AdminRequest(job_id=job_id, value=value)))
    return redirect(f"/ui/jobs/{job_id}")


def _home(uid: int) -> str:
    """Where a sync from the page keeps its cmlogs/ unless the form says: its user's home, as cmsync's is the
    directory it is run in."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_dir or "/"
    except KeyError:
        return "/"


async def submit(ctx: Context) -> HttpResponse:
    """A sync from the form: SRC, DST, nodes, --delete, --dry-run (the head checks it as it checks cmsync's)."""
    values = {k: ctx.field(k) for k in ("src", "dst", "nodes", "name", "cwd")}
    values.update({k: bool(ctx.field(k)) for k in ("delete", "dry_run")})
    try:
        nodes = int(values["nodes"] or 1)
        body = types.SyncJob(src=values["src"], dst=values["dst"], nodes=nodes, delete=values["delete"],
                             dry_run=values["dry_run"], name=values["name"] or None,
                             cwd=values["cwd"] or _home(ctx.caller.uid))
        job = types.submitted(msgspec.convert(msgspec.to_builtins(body), types.SyncJob))
        job_id = (await ctx.ask(Submit, Submit(job=job)))["job_id"]
    except (ValueError, msgspec.ValidationError) as exc:
        return html(422, render("submit.html", ctx, values=values, error=f"invalid form: {exc}"))
    except HttpError as exc:
        if exc.status not in (400, 403, 409, 422):
            raise
        return html(exc.status, render("submit.html", ctx, values=values, error=exc.message))
    return redirect(f"/ui/jobs/{job_id}")


# --- history -------------------------------------------------------------------------------------------------------


async def history_page(ctx: Context) -> HttpResponse:
    text = _query(ctx, "days")
    days = min(max(int(text), 1), 366) if text.isdigit() else 14
    from cm import store

    assert ctx.api.loop is not None
    since = history.day_start(time.time()) - (days - 1) * 86400
    try:
        records = await ctx.api.loop.run_in_executor(None, store.job_history, since)
    except (store.StoreError, store.DatabaseError) as exc:
        raise HttpError(503, f"the database is away: {str(exc)[:200]}") from None
    nodes = (await ctx.ask(Info, {"nodes_only": True})).nodes
    summary = history.summarize(records, {n.name: n.partition for n in nodes}, since, days)
    return html(200, render("history.html", ctx, days=days, **summary, chart=history.chart(summary["per_day"])))
