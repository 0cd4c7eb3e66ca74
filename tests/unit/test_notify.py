"""cm.head.notify without a head: what is accepted at submit, what messages show, the queue's bound, a 4xx
given up at once and a 5xx tried again (against a real http.server)."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import threading
import time

import pytest

from cm.head.notify import Notifier, NotifyError, check_url, job_fields, shown, sign


def test_only_http_and_https_urls_with_a_host_are_accepted():
    assert check_url("https://hooks.example.org/cm?t=1") == "https://hooks.example.org/cm?t=1"
    for bad in ("ftp://example.org/x", "file:///etc/passwd", "http://", "example.org/hook", "http://h:99999/",
                "http://host/a b", "javascript:alert(1)"):
        with pytest.raises(NotifyError):
            check_url(bad)
    assert job_fields(["http://h/x"], []) == {"notify": ["http://h/x"], "notify_on": ["end"]}
    assert job_fields(["http://h/x"], ["fail", "begin", "fail"])["notify_on"] == ["begin", "fail"]
    assert job_fields([], []) == {}
    with pytest.raises(NotifyError, match="needs --notify"):
        job_fields([], ["end"])


def test_messages_show_a_url_without_its_secrets():
    assert shown("https://user:pw@hooks.example.org:8443/cm/x?token=s3cret#f") == "https://hooks.example.org:8443/cm/x"


def job(state="COMPLETED", **fields):
    return {"_id": 7, "state": state, "notify": ["http://127.0.0.1:9/x"], "notify_on": ["end"], **fields}


def test_offering_never_waits_and_a_full_queue_drops_and_says_so():
    notifier = Notifier(b"k" * 32, [], 10, 1, view=lambda j: {"id": j["_id"]}, record=lambda *a: None, max_queued=1)
    started = time.monotonic()
    notifier.ended(job(notify=["http://a/1", "http://b/2"]))  # no worker runs: nothing is sent
    assert time.monotonic() - started < 1
    assert len(notifier.heap) == 1
    [(job_id, text)] = notifier.taken()
    assert job_id == 7 and "end to http://b/2 dropped" in text
    notifier.ended(job(state="FAILED", notify_on=["begin"]))  # neither end nor fail asked for
    notifier.began(job(notify_on=["end"]))
    assert len(notifier.heap) == 1


class Answers(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append(self.headers["X-CM-Signature"])  # type: ignore[attr-defined]
        status = self.server.statuses.pop(0) if self.server.statuses else 200  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    httpd.seen, httpd.statuses = [], []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_a_4xx_is_given_up_at_once_and_a_5xx_is_tried_again(server):
    recorded = []
    notifier = Notifier(b"k" * 32, [], 30, 5, view=lambda j: {"id": j["_id"]},
                        record=lambda job_id, text: recorded.append((job_id, text)))
    notifier.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/h"
        server.statuses = [404]
        notifier.ended(job(notify=[url]))
        deadline = time.monotonic() + 30
        while not recorded and time.monotonic() < deadline:
            time.sleep(0.02)
        assert recorded == [(7, f"end to {url} failed after 1 try: HTTP 404 Not Found")]
        server.statuses = [503]
        notifier.ended(job(notify=[url]))
        while notifier.delivered < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert notifier.delivered == 1 and len(server.seen) == 3 and server.seen[1] == server.seen[2]
        assert server.seen[1].startswith("sha256=") and len(recorded) == 1
    finally:
        notifier.stop()
    assert sign(b"k", b"{}") == "sha256=" + hmac.new(b"k", b"{}", hashlib.sha256).hexdigest()
