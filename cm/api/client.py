"""`cm.Client`: the HTTP API from Python, with the standard library only.

    from cm import Client
    client = Client()                                    # RUN_DIR/api.sock: you are who the kernel says
    client = Client("https://head:8080", token="cm2_...")  # TCP: you are who the token says (`cmtoken`)
    job_id = client.submit_sync("gpu:/results", "cpu:/archive", labels={"workflow": "w1"})
    view = client.wait(job_id)                          # long polls until the job is final

Over https the head is verified against its certificate: ``cafile``, else the
site's CM_API_CERT, else the one the head made (RUN_DIR/api.crt). Every
failure is a `cm.ApiError` with the HTTP status and the API's message.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from cm.api.views import FINAL, exit_code_of, is_final

__all__ = ["ApiError", "Client", "FINAL", "exit_code_of", "is_final"]


class ApiError(Exception):
    """The API refused a request (status 4xx/5xx) or could not be reached (status 0)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message = status, message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _socket_path() -> str:
    from cm import config

    return str(config.load().api_socket_path)


def _head_cert() -> str:
    from cm import config
    from cm.api.tls import cert_file

    return str(cert_file(config.load()))


class Client:
    """A connection to the head's HTTP API (kept open between calls; not for use by several threads)."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 90.0,
                 cafile: str | None = None):
        """No url: the local head's RUN_DIR/api.sock (CM_RUN_DIR, as the commands find theirs); a path or
        ``unix:PATH``: that socket; ``https://host:port``: TCP, where ``token`` is required and the head is
        verified against ``cafile`` (default: the head's certificate, see above); ``http://`` only where the
        site turned TLS off on loopback."""
        self.timeout = timeout
        self.token = token
        if url is None or url.startswith("unix:") or url.startswith("/"):
            self.where = url.removeprefix("unix:") if url else _socket_path()
            self._make = lambda: _UnixConnection(self.where, self.timeout)
        else:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"url must be http://HOST:PORT, https://HOST:PORT or unix:PATH, not {url!r}")
            self.where = url
            if parts.scheme == "https":
                try:
                    context = ssl.create_default_context(cafile=cafile or _head_cert())
                except (OSError, ssl.SSLError) as exc:
                    raise ApiError(0, f"cannot read the head's certificate {cafile or _head_cert()}: {exc}") from None
                self._make = lambda: http.client.HTTPSConnection(parts.hostname, parts.port, timeout=self.timeout,
                                                                 context=context)
            else:
                self._make = lambda: http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout)
        self._conn: http.client.HTTPConnection | None = None

    # --- the operations ------------------------------------------------------

    def submit_command(self, argv: list[str], *, labels: dict[str, str] | None = None,
                       idempotency_key: str | None = None, **options: Any) -> int:
        """Submit a command job; options are cmrun's (nodes, procs, cpus, mem_mb, time, name, partition,
        stdout, stderr, requeue, hold, cwd, env). Returns the job id."""
        body = {"type": "command", "argv": list(argv), **options, "labels": labels or {}}
        return self._submit(body, idempotency_key)

    def submit_sync(self, src: str, dst: str, *, labels: dict[str, str] | None = None,
                    idempotency_key: str | None = None, **options: Any) -> int:
        """Submit a sync job from SRC to DST (PARTITION:/path or NODE:/path); options are cmsync's (nodes,
        delete, dry_run, checksum, exclude, bwlimit in bytes/s, transport, policy, time, name). Returns the id."""
        body = {"type": "sync", "src": src, "dst": dst, **options, "labels": labels or {}}
        return self._submit(body, idempotency_key)

    def status(self, job_id: int, wait: float = 0) -> dict:
        """The job's view; with ``wait`` > 0 the head answers when the job is final or after that many seconds
        (at most 60; negative: the longest allowed)."""
        query = f"?wait={wait:g}" if wait else ""
        return self._call("GET", f"/v1/jobs/{int(job_id)}{query}", timeout=self.timeout + max(wait, 0) + 60)

    def wait(self, job_id: int, timeout: float | None = None) -> dict:
        """Long-poll until the job is final (or ``timeout`` seconds pass: then ApiError 408); its last view."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 60.0 if deadline is None else min(60.0, deadline - time.monotonic())
            if left <= 0:
                raise ApiError(408, f"job {job_id} is not final after {timeout:g} s")
            view = self.status(job_id, wait=left)
            if is_final(view):
                return view

    def files(self, job_id: int, offset: int = 0, limit: int = 1000, action: str | None = None) -> dict:
        """A page of a sync's per-file report: {"job_id", "files": [line, ...], "next": offset or None}."""
        query = f"?offset={int(offset)}&limit={int(limit)}" + (f"&action={action}" if action else "")
        return self._call("GET", f"/v1/jobs/{int(job_id)}/files{query}")

    def cancel(self, job_id: int) -> str:
        """Cancel a job; the state it is in now ("cancelled" or "cancelling")."""
        return self._call("POST", f"/v1/jobs/{int(job_id)}/cancel")["state"]

    def delete(self, job_id: int) -> None:
        """Delete a finished job (ApiError 409 while it is active)."""
        self._call("DELETE", f"/v1/jobs/{int(job_id)}")

    def jobs(self, state: str | None = None, user: str | None = None, labels: dict[str, str] | None = None,
             all: bool = False) -> list[dict]:
        """Jobs as cminfo lists them (all: also those that finished long ago), filtered."""
        query: list[tuple[str, str]] = []
        if state:
            query.append(("state", state))
        if user:
            query.append(("user", user))
        query += [("label", f"{k}={v}") for k, v in (labels or {}).items()]
        if all:
            query.append(("all", "true"))
        return self._call("GET", "/v1/jobs" + (f"?{urlencode(query)}" if query else ""))["jobs"]

    def accounting(self, ended_after: float, ended_before: float | None = None, user: str | None = None,
                   all_users: bool = False, states: list[str] = (), name: str | None = None,
                   labels: dict[str, str] | None = None) -> dict:
        """Finished jobs that ended in [ended_after, ended_before) (epoch seconds), as cmacct: ``jobs``,
        ``totals`` per user and partition pair, ``truncated``. Your own jobs unless you are an admin."""
        query: list[tuple[str, str]] = [("ended_after", repr(float(ended_after)))]
        if ended_before is not None:
            query.append(("ended_before", repr(float(ended_before))))
        if user:
            query.append(("user", user))
        if all_users:
            query.append(("all_users", "true"))
        if states:
            query.append(("state", ",".join(states)))
        if name:
            query.append(("name", name))
        query += [("label", f"{k}={v}") for k, v in (labels or {}).items()]
        return self._call("GET", f"/v1/jobs?{urlencode(query)}")

    def nodes(self) -> list[dict]:
        return self._call("GET", "/v1/nodes")["nodes"]

    def admin(self, action: str, **target: Any) -> dict:
        """hold/release/priority (job_id, value), drain/resume (node, reason), block/unblock (user)."""
        return self._call("POST", f"/v1/admin/{quote(action)}", target)

    def version(self) -> dict:
        return self._call("GET", "/v1/version")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- HTTP ----------------------------------------------------------------

    def _submit(self, body: dict, key: str | None) -> int:
        headers = {"Idempotency-Key": key} if key else {}
        return self._call("POST", "/v1/jobs", body, headers)["id"]

    def _call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
              timeout: float | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile is opened again, once
            if self._conn is None:
                self._conn = self._make()
            self._conn.timeout = timeout or self.timeout
            if self._conn.sock is not None:
                self._conn.sock.settimeout(self._conn.timeout)
            try:
                self._conn.request(method, path, data, all_headers)
                response = self._conn.getresponse()
                payload = response.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if attempt:
                    raise ApiError(0, f"lost the connection to {self.where}: {exc}") from None
            except ssl.SSLError as exc:
                self.close()
                raise ApiError(0, f"TLS with {self.where} failed: {exc.reason or exc} (is the certificate you "
                                  "verify with this head's?)") from None
            except OSError as exc:
                self.close()
                raise ApiError(0, f"cannot reach the head's API at {self.where}: {exc.strerror or exc} "
                                  "(is the cluster up?)") from None
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        if response.status >= 400:
            try:
                message = json.loads(payload)["error"]
            except (ValueError, KeyError, TypeError):
                message = payload[:300].decode("utf-8", "replace") or response.reason
            raise ApiError(response.status, message)
        if response.status == 204 or not payload:
            return None
        if response.getheader("Content-Type", "").startswith("application/json"):
            return json.loads(payload)
        return payload.decode()
