"""What each method and path of the HTTP API does: decode the body into its type, ask the head, map the reply.

Every path here maps onto an operation of the commands (cm.head.requests);
nothing is decided twice. The head's refusals carry an ErrorCode, and
STATUS says which HTTP status answers it: 400 bad input, 403 not yours,
404 no such job, 409 wrong state (still active, already final), 503 the
database is away.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import msgspec

from cm.api import types
from cm.api.http import HttpError, HttpRequest, HttpResponse, error_response, json_response
from cm.callers import Caller
from cm.protocol import (
    MAX_WAIT, Cancel, ClientRequest, Control, Delete, ErrorCode, Files, Info, Metrics, Submit, Wait, named,
)

if TYPE_CHECKING:
    from cm.api.server import ApiServer

METHODS = ("GET", "POST", "DELETE", "HEAD", "PUT", "PATCH", "OPTIONS")
PUBLIC = {"/healthz", "/readyz", "/openapi.json", "/v1/version"}
JOB = re.compile(r"/v1/jobs/(\d{1,18})")
CANCEL = re.compile(r"/v1/jobs/(\d{1,18})/cancel")
FILES = re.compile(r"/v1/jobs/(\d{1,18})/files")
ADMIN = re.compile(r"/v1/admin/([a-z]+)")
_submission = msgspec.json.Decoder(types.JobSubmission)
_admin = msgspec.json.Decoder(types.AdminRequest)


def is_public(path: str) -> bool:
    return path in PUBLIC


STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_MESSAGE: 400, ErrorCode.REFUSED: 400, ErrorCode.UNKNOWN_OPERATION: 400,
    ErrorCode.UNKNOWN_NODE: 400, ErrorCode.FORBIDDEN: 403, ErrorCode.NOT_FOUND: 404, ErrorCode.CONFLICT: 409,
    ErrorCode.DB_UNAVAILABLE: 503, ErrorCode.INTERNAL: 500,
    # the intercom's codes (no HTTP operation answers with them today; mapped so none can become a 500)
    ErrorCode.LIMIT: 413, ErrorCode.ENDED: 409, ErrorCode.TIMEOUT: 408, ErrorCode.HEAD_UNAVAILABLE: 503,
}


def status_of(code: ErrorCode | str | None) -> int:
    """The HTTP status that answers a refusal with this code."""
    try:
        return STATUS.get(ErrorCode(code), 500)
    except ValueError:
        return 500  # the head gave no code: a bug


async def ask(api: "ApiServer", caller: Caller, kind: type[ClientRequest], args: dict[str, Any] | ClientRequest,
               watch: HttpRequest | None = None) -> Any:
    """Ask the head ``kind`` with ``args``, checked against kind's limits here (as the commands' socket checks
    what it decodes: a query's values and headers were not, a Struct's constructor checks no limits) and
    refused with 400 naming the field."""
    try:
        request = msgspec.convert(msgspec.to_builtins(args) if isinstance(args, ClientRequest) else args, kind)
    except msgspec.ValidationError as exc:
        raise HttpError(400, named(exc, f"{kind.TYPE} arguments")) from None
    reply = await api.ask(caller, request, watch)
    if not reply.ok:
        raise HttpError(status_of(reply.code), reply.error)
    return reply.data


def _decode(decoder: msgspec.json.Decoder, request: HttpRequest) -> Any:
    try:  # JSON whatever the Content-Type says (curl -d sends form-urlencoded)
        return decoder.decode(request.body or b"{}")
    except msgspec.ValidationError as exc:
        raise HttpError(422, f"invalid body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise HttpError(400, f"body is not JSON: {exc}") from None


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise HttpError(400, f"give {name} once")
    return values[0]


def _flag(query: dict[str, list[str]], name: str) -> bool:
    value = _one(query, name)
    if value is None:
        return False
    if value.lower() not in ("", "1", "true", "yes", "0", "false", "no"):
        raise HttpError(400, f"{name} must be true or false")
    return value.lower() in ("", "1", "true", "yes")


async def submit(api: "ApiServer", caller: Caller, request: HttpRequest) -> HttpResponse:
    job = types.submitted(_decode(_submission, request), request.headers.get("idempotency-key"))
    data = await ask(api, caller, Submit, Submit(job=job))
    return json_response(200 if data.get("repeated") else 201, {"id": data["job_id"]})


async def list_jobs(api: "ApiServer", caller: Caller, request: HttpRequest) -> HttpResponse:
    q = request.query
    if "ended_after" in q or "ended_before" in q:
        return await accounting(api, caller, request)
    args = {"all": _flag(q, "all"), "state": [s.upper() for s in q.get("state", []) if s],
            "user": _one(q, "user") or None, "label": q.get("label", [])}
    data = await ask(api, caller, Info, args)
    return json_response(200, {"jobs": data.jobs})


def _when(query: dict[str, list[str]], name: str) -> float | None:
    """An instant in a query: epoch seconds, or ISO 8601 (local time unless it names its zone)."""
    text = _one(query, name)
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    import datetime

    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise HttpError(400, f"{name} must be epoch seconds or ISO 8601 (2026-12-01T08:00), "
                             f"not {text[:40]!r}") from None


async def accounting(api: "ApiServer", caller: Caller, request: HttpRequest) -> HttpResponse:
    """Finished jobs that ended in a window, with totals per user and partition pair (cmacct; cm.acct).
    Read from the database in the API's executor: the head's loop is not involved."""
    from cm import store
    from cm import acct

    q = request.query
    after, before = _when(q, "ended_after") or 0.0, _when(q, "ended_before")
    labels = {}
    for label in q.get("label", []):
        key, sep, value = label.partition("=")
        if not sep or not key:
            raise HttpError(400, f"label {label[:80]!r} must look like KEY=VALUE")
        labels[key] = value
    try:
        user = acct.whose(caller, _one(q, "user") or None, _flag(q, "all_users"))
    except acct.Forbidden as exc:
        raise HttpError(403, str(exc)) from None
    states = [name.upper() for given in q.get("state", []) for name in given.split(",") if name]
    unknown = sorted(set(states) - set(acct.FINAL))
    if unknown:
        raise HttpError(400, f"state {unknown[0][:40]!r}: finished jobs are {', '.join(acct.FINAL)}")
    assert api.loop is not None
    try:
        data = await api.loop.run_in_executor(None, acct.report, after, before, user, states,
                                              _one(q, "name") or None, labels)
    except store.DatabaseError as exc:
        raise HttpError(503, f"the database did not answer: {str(exc)[:200]}") from None
    return json_response(200, data)


async def job_status(api: "ApiServer", caller: Caller, request: HttpRequest, job_id: int) -> HttpResponse:
    text = _one(request.query, "wait")
    wait = 0.0
    if text is not None:
        try:
            wait = float(text)
        except ValueError:
            raise HttpError(400, f"wait must be a number of seconds, not {text[:40]!r}") from None
        if wait != wait:
            raise HttpError(400, "wait must be a number of seconds")
        wait = MAX_WAIT if wait < 0 else min(wait, MAX_WAIT)  # negative: as long as the head allows
    if wait > 0:
        data = await ask(api, caller, Wait, {"job_id": job_id, "timeout": wait}, watch=request)
    else:
        data = await ask(api, caller, Info, {"job_id": job_id})
    return json_response(200, data.jobs[0])


async def cancel(api: "ApiServer", caller: Caller, request: HttpRequest, job_id: int) -> HttpResponse:
    data = await ask(api, caller, Cancel, {"job_ids": [job_id]})
    result = data[str(job_id)]
    if not result["ok"]:
        raise HttpError(status_of(result.get("code")), result["error"])
    return json_response(202, {"state": result["state"]})


async def job_files(api: "ApiServer", caller: Caller, request: HttpRequest, job_id: int) -> HttpResponse:
    args: dict[str, Any] = {"job_id": job_id}
    for name in ("offset", "limit"):
        text = _one(request.query, name)
        if text is not None:
            try:
                args[name] = int(text)
            except ValueError:
                raise HttpError(400, f"{name} must be an integer, not {text[:40]!r}") from None
    action = _one(request.query, "action")
    if action:
        args["action"] = action
    return json_response(200, await ask(api, caller, Files, args))


async def delete(api: "ApiServer", caller: Caller, request: HttpRequest, job_id: int) -> HttpResponse:
    await ask(api, caller, Delete, {"job_id": job_id})
    return HttpResponse(204)


async def nodes(api: "ApiServer", caller: Caller, request: HttpRequest) -> HttpResponse:
    data = await ask(api, caller, Info, {"nodes_only": True})
    return json_response(200, {"nodes": data.nodes})


async def admin(api: "ApiServer", caller: Caller, request: HttpRequest, action: str) -> HttpResponse:
    if action not in types.ADMIN_ACTIONS:
        raise HttpError(404, f"no admin operation {action!r}: use one of {', '.join(types.ADMIN_ACTIONS)}")
    body = _decode(_admin, request)
    need = {"hold": "job_id", "release": "job_id", "priority": "job_id", "drain": "node", "resume": "node"}
    if action in need and getattr(body, need[action]) in (None, ""):
        raise HttpError(422, f"{action} needs {need[action]}")
    if action == "priority" and body.value is None:
        raise HttpError(422, "priority needs value: high, normal, low or an integer")
    return json_response(200, await ask(api, caller, Control, types.admin_request(action, body)))


async def metrics(api: "ApiServer", caller: Caller, request: HttpRequest) -> HttpResponse:
    from cm.api.metrics import render

    data = await ask(api, caller, Metrics, {})
    return HttpResponse(200, render(data, api.requests).encode(), "text/plain; version=0.0.4; charset=utf-8")


async def readyz(api: "ApiServer") -> HttpResponse:
    from cm import store

    assert api.loop is not None
    if await api.loop.run_in_executor(None, store.ping, 1.0):
        return json_response(200, {"ready": True})
    return error_response(503, "the database is unreachable")


async def dispatch(api: "ApiServer", caller: Caller | None, request: HttpRequest) -> HttpResponse:
    method, path = request.method, request.path.rstrip("/") or "/"
    if method == "GET":
        if path == "/healthz":
            return json_response(200, {"alive": True})
        if path == "/readyz":
            return await readyz(api)
        if path == "/v1/version":
            from cm import __version__

            return json_response(200, {"version": __version__, "api_versions": ["v1"]})
        if path == "/openapi.json":
            from cm.api.openapi import document

            return HttpResponse(200, document())
    if caller is None:  # a public path with another method (ApiServer asks for a token everywhere else)
        raise HttpError(405, f"no {method[:20]} {path[:200]}")
    route = _route(method, path)
    if route is None:
        raise HttpError(404 if not _known(path) else 405, f"no {method} {path[:200]}")
    handler, params = route
    return await handler(api, caller, request, *params)


def _route(method: str, path: str):
    if path == "/v1/jobs":
        return {"GET": (list_jobs, ()), "POST": (submit, ())}.get(method)
    if path == "/v1/nodes" and method == "GET":
        return nodes, ()
    if path == "/metrics" and method == "GET":
        return metrics, ()
    if (m := JOB.fullmatch(path)):
        return {"GET": (job_status, (int(m[1]),)), "DELETE": (delete, (int(m[1]),))}.get(method)
    if (m := CANCEL.fullmatch(path)) and method == "POST":
        return cancel, (int(m[1]),)
    if (m := FILES.fullmatch(path)) and method == "GET":
        return job_files, (int(m[1]),)
    if (m := ADMIN.fullmatch(path)) and method == "POST":
        return admin, (m[1],)
    return None


def _known(path: str) -> bool:
    return path in ("/v1/jobs", "/v1/nodes", "/metrics", *PUBLIC) or any(
        r.fullmatch(path) for r in (JOB, CANCEL, FILES, ADMIN))
