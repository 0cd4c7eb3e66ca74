"""Webhooks: a job's view POSTed as JSON to its ``--notify`` URLs (and the site's CM_NOTIFY_URLS) when it
begins, ends or fails, signed, retried with back-off, from threads of their own.

The head's loop only calls ``began``/``ended``: they build the body (the job's view, as ``cminfo --json``
shows it) and put it on a bounded queue without waiting; a full queue drops the delivery and says so on the
job. Worker threads POST, each delivery retried (1 s, 2 s, 4 s, ... at most 60 s apart) for
CM_NOTIFY_RETRY_FOR seconds. A 2xx answer delivers; a 4xx other than 408 and 429 is final at once; anything
else (5xx, refused, timed out, TLS) is tried again. A delivery that fails for good is written on the job
(``notify_error``, shown by ``cminfo JOBID``) by the worker, and handed to the loop (``failures``) for the
job as it keeps it in memory. Deliveries live in memory: those still queued or retrying when the head stops
are lost (a receiver that must not miss an end can ask ``GET /v1/jobs?ended_after=...``).

Each POST carries ``X-CM-Signature: sha256=HEX``, the HMAC-SHA256 of the exact body with the site's
notify secret, RUN_DIR/keys/notify.key (32 bytes, made by the head like its other secrets);
``X-CM-Event`` (begin, end, fail) and ``X-CM-Delivery`` (one id per delivery, the same on every retry of it,
also in the body). docs/API.md shows a receiver checking it.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import http.client
import itertools
import logging
import os
import queue
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

from cm.logs import event
from cm.protocol import NOTIFY_URL_MAX

log = logging.getLogger("cm.head.notify")
FAILED_STATES = frozenset({"FAILED", "TIMEOUT", "NODE_FAIL"})  # "fail": ended badly (not COMPLETED, not CANCELLED)
MAX_QUEUED = 10000  # deliveries waiting or retrying at once; past it a new one is dropped (and said so)
WORKERS = 4
FIRST_RETRY, LAST_RETRY = 1.0, 60.0
SIGNATURE = "X-CM-Signature"


class NotifyError(ValueError):
    """A --notify URL or --notify-on event that is refused; the message is for the user."""


def check_url(url: str) -> str:
    """An http(s) URL with a host, as given; NotifyError otherwise."""
    if len(url) > NOTIFY_URL_MAX:  # a submission's schema says so too; CM_NOTIFY_URLS has none
        raise NotifyError(f"--notify URL of {len(url)} characters: at most {NOTIFY_URL_MAX}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise NotifyError(f"--notify {url[:200]!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotifyError(f"--notify {url[:200]!r}: only http:// and https:// URLs with a host are accepted")
    if any(c.isspace() for c in url):
        raise NotifyError(f"--notify {url[:200]!r}: a URL has no spaces")
    return url


def job_fields(urls: list[str], on: list[str]) -> dict[str, Any]:
    """What a submission stores for its notifications (default event: end); NotifyError for what is refused
    (the events and the number of URLs are checked with the request's schema: cm.protocol.Submit)."""
    if not urls:
        if on:
            raise NotifyError("--notify-on needs --notify URL")
        return {}
    return {"notify": [check_url(u) for u in urls], "notify_on": sorted(set(on)) if on else ["end"]}


def shown(url: str) -> str:
    """A URL as messages show it: no user, password, query or fragment (they may hold a receiver's secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass(order=True)
class Delivery:
    due: float  # monotonic: when to try next
    seq: int
    job_id: int = field(compare=False)
    url: str = field(compare=False)
    event: str = field(compare=False)
    body: bytes = field(compare=False)
    delivery: str = field(compare=False)
    first: float = field(compare=False, default=0.0)  # monotonic: the first try
    tries: int = field(compare=False, default=0)


class Permanent(Exception):
    """An answer that no retry will change (a 4xx)."""


class Notifier:
    """Deliveries of webhook POSTs, from ``workers`` threads. ``view(job)``: the job as its body shows it
    (cm.head.requests.job_view); ``record(job_id, text)``: write a failed delivery on the job (the database,
    from a worker thread)."""

    def __init__(self, secret: bytes, site_urls: list[str], retry_for: float, timeout: float,
                 view: Callable[[dict[str, Any]], Any], record: Callable[[int, str], None], workers: int = WORKERS,
                 max_queued: int = MAX_QUEUED):
        self.secret, self.site_urls, self.view = secret, site_urls, view
        self.retry_for, self.timeout, self.record = retry_for, timeout, record
        self.workers, self.max_queued = workers, max_queued
        self.heap: list[Delivery] = []
        self.cond = threading.Condition()
        self.seq = itertools.count()
        self.stopping = False
        self.threads: list[threading.Thread] = []
        self.failures: queue.SimpleQueue[tuple[int, str]] = queue.SimpleQueue()  # for the head's loop
        self.failed: dict[int, list[str]] = {}  # job -> its failed deliveries (workers only)
        self.delivered = 0

    @classmethod
    def for_site(cls, settings, view: Callable[[dict[str, Any]], Any],
                 record: Callable[[int, str], None]) -> "Notifier":
        from cm.keys import NOTIFY_SECRET, secret

        urls = []
        for url in (u.strip() for u in settings.notify_urls.split(",")):
            if not url:
                continue
            try:
                urls.append(check_url(url))
            except NotifyError as exc:
                event(log, "CM_NOTIFY_URLS: a URL is ignored", logging.ERROR, error=str(exc))
        return cls(secret(settings.run_dir, NOTIFY_SECRET), urls, settings.notify_retry_for, settings.notify_timeout,
                   view, record)

    # --- the head's loop: never waits -------------------------------------------

    def began(self, job: dict[str, Any] | None) -> None:
        if job is not None and "begin" in (job.get("notify_on") or ()):
            self._offer(job, "begin", job.get("notify") or [])

    def ended(self, job: dict[str, Any] | None) -> None:
        if job is None:
            return
        on = job.get("notify_on") or ()
        failed = job["state"] in FAILED_STATES
        name = "fail" if failed and "fail" in on else "end"
        mine = (job.get("notify") or []) if "end" in on or (failed and "fail" in on) else []
        self._offer(job, name, [*mine, *(u for u in self.site_urls if u not in mine)])

    def _offer(self, job: dict[str, Any], name: str, urls: list[str]) -> None:
        if not urls:
            return
        import msgspec

        delivery = os.urandom(8).hex()
        body = msgspec.json.encode({"event": name, "delivery": delivery, "sent": time.time(), "job": self.view(job)})
        now = time.monotonic()
        with self.cond:
            for url in urls:
                if len(self.heap) >= self.max_queued:
                    self.failures.put((job["_id"], f"{name} to {shown(url)} dropped: {self.max_queued} deliveries "
                                                   "were waiting"))
                    continue
                heapq.heappush(self.heap, Delivery(now, next(self.seq), job["_id"], url, name, body, delivery, now))
            self.cond.notify(len(urls))

    # --- workers ----------------------------------------------------------------

    def start(self) -> None:
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"notify-{i}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        """Stop the workers (what is still queued is dropped: deliveries live as long as the head)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        deadline = time.monotonic() + 2.0  # a POST in flight may take CM_NOTIFY_TIMEOUT: not waited out
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.threads = []

    def _next(self) -> Delivery | None:
        with self.cond:
            while not self.stopping:
                if self.heap and self.heap[0].due <= time.monotonic():
                    return heapq.heappop(self.heap)
                self.cond.wait(None if not self.heap else max(0.0, self.heap[0].due - time.monotonic()))
            return None

    def _work(self) -> None:
        while (d := self._next()) is not None:
            d.tries += 1
            try:
                self.post(d)
            except Permanent as exc:
                self._failed(d, str(exc))
            except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
                wait = min(LAST_RETRY, FIRST_RETRY * 2 ** (d.tries - 1))
                if time.monotonic() + wait - d.first > self.retry_for:
                    self._failed(d, str(exc) or type(exc).__name__)
                    continue
                with self.cond:
                    d.due = time.monotonic() + wait
                    heapq.heappush(self.heap, d)
                    self.cond.notify()
            else:
                with self.cond:
                    self.delivered += 1

    def post(self, d: Delivery) -> None:
        """One try: raises Permanent for a 4xx (not 408, 429), OSError or HTTPException for what may pass."""
        parts = urlsplit(d.url)
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=self.timeout, context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"Content-Type": "application/json", SIGNATURE: sign(self.secret, d.body), "X-CM-Event": d.event,
                   "X-CM-Delivery": d.delivery, "User-Agent": "cm-notify"}
        if parts.username is not None:
            import base64

            pair = f"{parts.username}:{parts.password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        try:
            conn.request("POST", path, d.body, headers)
            response = conn.getresponse()
            response.read(65536)
        finally:
            conn.close()
        if 200 <= response.status < 300:
            return
        text = f"HTTP {response.status} {response.reason}"
        if 400 <= response.status < 500 and response.status not in (408, 429):
            raise Permanent(text)
        raise http.client.HTTPException(text)

    def _failed(self, d: Delivery, error: str) -> None:
        text = f"{d.event} to {shown(d.url)} failed after {d.tries} {'try' if d.tries == 1 else 'tries'}: {error[:300]}"
        event(log, "webhook delivery failed", logging.WARNING, job=d.job_id, failure=text)
        with self.cond:
            texts = self.failed.setdefault(d.job_id, [])
            texts.append(text)
            if len(self.failed) > self.max_queued:  # only the latest jobs' are kept here; the database has all
                self.failed.pop(next(iter(self.failed)))
            whole = "; ".join(texts)
        self.failures.put((d.job_id, whole))
        from cm import store

        try:
            self.record(d.job_id, whole)
        except store.DatabaseError as exc:  # the database is away: the head's memory still shows it
            event(log, "a failed webhook delivery could not be written on its job", logging.WARNING, job=d.job_id,
                  error=str(exc)[:300])

    def taken(self) -> list[tuple[int, str]]:
        """(job, what failed) since the last call: for the head's loop to show on the job it keeps."""
        out = []
        while True:
            try:
                out.append(self.failures.get_nowait())
            except queue.Empty:
                return out
