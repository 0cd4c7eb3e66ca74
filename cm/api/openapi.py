"""/openapi.json: the paths of CONTRACT.md with the bodies' schemas generated from cm.api.types."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from cm import __version__
from cm.api import types

REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict:
    return {"$ref": REF.format(name=name)}


def _json(schema: dict, description: str = "") -> dict:
    return {"description": description or "OK", "content": {"application/json": {"schema": schema}}}


ERRORS = {code: _json(_ref("ErrorBody"), text) for code, text in (
    ("400", "bad input"), ("401", "no valid bearer token (TCP)"), ("403", "not yours, or not an administrator"),
    ("404", "no such job or node"), ("409", "the job is in the wrong state for this"),
    ("413", "body too large"), ("422", "the body does not fit its schema"),
    ("503", "the database is unreachable"))}


def _op(summary: str, responses: dict, parameters: list | None = None, body: dict | None = None,
        public: bool = False) -> dict:
    op: dict[str, Any] = {"summary": summary, "responses": {**responses, **ERRORS}}
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if public:
        op["security"] = []
    return op


JOB_ID = {"name": "id", "in": "path", "required": True,
          "schema": {"type": "integer", "minimum": 0, "maximum": 999999999999999999}}


@functools.cache
def document() -> bytes:
    (submission, *_), components = msgspec.json.schema_components(
        [types.JobSubmission, types.Submitted, types.JobView, types.JobList, types.NodeList, types.CancelResult,
         types.FileList,
         types.AdminRequest, types.ErrorBody, types.Version], ref_template=REF)
    paths = {
        "/healthz": {"get": _op("the head process is alive", {"200": _json({"type": "object"})}, public=True)},
        "/readyz": {"get": _op("the database is reachable", {"200": _json({"type": "object"})}, public=True)},
        "/v1/version": {"get": _op("versions", {"200": _json(_ref("Version"))}, public=True)},
        "/metrics": {"get": _op("Prometheus text format", {"200": {"description": "metrics", "content": {
            "text/plain": {"schema": {"type": "string"}}}}})},
        "/v1/jobs": {
            "post": _op("submit a command or sync job", {
                "201": _json(_ref("Submitted"), "submitted"),
                "200": _json(_ref("Submitted"), "the job first submitted with this Idempotency-Key")},
                [{"name": "Idempotency-Key", "in": "header", "required": False,
                  "schema": {"type": "string", "minLength": 1, "maxLength": 200}}], body=submission),
            "get": _op("list jobs", {"200": _json(_ref("JobList"))}, [
                {"name": "state", "in": "query", "schema": {"type": "string"}},
                {"name": "user", "in": "query", "schema": {"type": "string"}},
                {"name": "label", "in": "query", "description": "KEY=VALUE",
                 "schema": {"type": "string", "pattern": "^[^=]+=.*$"}},
                {"name": "all", "in": "query", "description": "include jobs that finished long ago",
                 "schema": {"type": "boolean"}},
                # accounting (cmacct): either of these lists finished jobs by when they ended, with totals
                {"name": "ended_after", "in": "query", "description": "epoch seconds or ISO 8601: accounting",
                 "schema": {"type": "string"}},
                {"name": "ended_before", "in": "query", "description": "epoch seconds or ISO 8601: accounting",
                 "schema": {"type": "string"}},
                {"name": "name", "in": "query", "description": "accounting: this job name",
                 "schema": {"type": "string"}},
                {"name": "all_users", "in": "query", "description": "accounting: every user's jobs (admins)",
                 "schema": {"type": "boolean"}}]),
        },
        "/v1/jobs/{id}": {
            "get": _op("one job; with wait=S, answered when the job is final or after S seconds (negative: "
                       "the longest wait allowed, 60 s; 0: at once)", {"200": _json(_ref("JobView"))},
                       [JOB_ID, {"name": "wait", "in": "query", "schema": {"type": "number"}}]),
            "delete": _op("delete a finished job", {"204": {"description": "deleted"}}, [JOB_ID]),
        },
        "/v1/jobs/{id}/files": {"get": _op("a page of a sync's per-file report", {"200": _json(_ref("FileList"))}, [
            JOB_ID, {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10000}},
            {"name": "action", "in": "query",
             "schema": {"enum": ["created", "updated", "deleted", "skipped", "failed"]}}])},
        "/v1/jobs/{id}/cancel": {"post": _op("cancel a job", {"202": _json(_ref("CancelResult"))}, [JOB_ID])},
        "/v1/nodes": {"get": _op("the nodes", {"200": _json(_ref("NodeList"))})},
    }
    for action in types.ADMIN_ACTIONS:
        paths[f"/v1/admin/{action}"] = {"post": _op(f"{action}, as cmcontrol {action}",
                                                    {"200": _json({"type": "object"})}, body=_ref("AdminRequest"))}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "cm HTTP API", "version": __version__,
                 "description": "Jobs, nodes and admin of a cm cluster. On RUN_DIR/api.sock the caller is the "
                                "connecting process's user; on TCP, the owner of the bearer token (`cmtoken`)."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
    return msgspec.json.encode(doc)
