"""A small HTTP/1.1 server on asyncio streams: parse one request at a time per connection, bounded.

Bounds against careless and hostile clients: the request line and headers
must fit in MAX_HEAD bytes and arrive within `timeout` seconds (slow loris),
a body may not exceed `max_body` bytes nor take longer than `timeout`, an
idle keep-alive connection is closed after IDLE seconds. Anything malformed
gets a 4xx with a JSON error and the connection is closed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec

MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
IDLE = 120.0  # seconds a keep-alive connection may sit between requests
REASONS = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 303: "See Other", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
           411: "Length Required", 413: "Content Too Large", 415: "Unsupported Media Type",
           422: "Unprocessable Content", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}


class HttpError(Exception):
    """Answer with `status` and {"error": message}."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


@dataclass
class HttpRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""
    keep_alive: bool = True
    reader: asyncio.StreamReader | None = None  # to notice a long-polling client leave


@dataclass
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, value) -> HttpResponse:
    return HttpResponse(status, msgspec.json.encode(value) if status != 204 else b"")


def error_response(status: int, message: str) -> HttpResponse:
    return json_response(status, {"error": message})


async def read_request(reader: asyncio.StreamReader, timeout: float, max_body: int, first: bool) -> HttpRequest | None:
    """The next request on a connection, or None when the client closed it (or stayed idle)."""
    try:  # between requests a connection may idle; once a request begins, it must arrive whole in time
        start = await asyncio.wait_for(reader.readexactly(1), timeout if first else IDLE)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
        return None
    try:
        head = start + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise HttpError(400, "incomplete request", close=True) from None
        return None
    except asyncio.LimitOverrunError:
        raise HttpError(431, f"request line and headers exceed {MAX_HEAD} bytes", close=True) from None
    except asyncio.TimeoutError:
        raise HttpError(408, f"request not complete within {timeout:g} s", close=True) from None
    except ConnectionError:
        return None
    if len(head) > MAX_HEAD:
        raise HttpError(431, f"request line and headers exceed {MAX_HEAD} bytes", close=True)
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise HttpError(400, "undecodable request", close=True) from None
    lines = text.split("\r\n")[:-2]
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise HttpError(400, "malformed request line", close=True)
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, f"unsupported protocol {version[:20]!r}", close=True)
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} headers", close=True)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
            raise HttpError(400, "malformed header line", close=True)
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise HttpError(411, "send a Content-Length (chunked bodies are not accepted)", close=True)
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit() or len(length_text) > 12:
        raise HttpError(400, "bad Content-Length", close=True)
    length = int(length_text)
    if length > max_body:
        raise HttpError(413, f"body of {length} bytes exceeds {max_body}", close=True)
    body = b""
    if length:
        try:
            body = await asyncio.wait_for(reader.readexactly(length), timeout)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            raise HttpError(408, "body not received in time", close=True) from None
    try:
        url = urlsplit(target)
        query = parse_qs(url.query, keep_blank_values=True, strict_parsing=False, max_num_fields=100)
        path = unquote(url.path, errors="strict")
    except ValueError as exc:
        raise HttpError(400, f"bad request target: {exc}", close=True) from None
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
    return HttpRequest(method, path, query, headers, body, keep_alive, reader)


def encode_response(response: HttpResponse, keep_alive: bool) -> bytes:
    reason = REASONS.get(response.status, "Unknown")
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    if response.status != 204:
        lines.append(f"Content-Type: {response.content_type}")
        lines.append(f"Content-Length: {len(response.body)}")
    lines.extend(f"{k}: {v}" for k, v in response.headers.items())
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (response.body if response.status != 204 else b"")
