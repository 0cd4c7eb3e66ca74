"""Webhooks against a real HTTP server started here: --notify on cmrun, cmsync and the API, signed bodies,
--notify-on events, the site's CM_NOTIFY_URLS, retries, and a receiver that is down shown in cminfo JOBID."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import signal
import socket
import threading
import time

import pytest

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


class Receiver(http.server.ThreadingHTTPServer):
    """Keeps every POST (path, headers, body); answers ``fail_first[path]`` of them with 500 first."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.posts: list[tuple[str, dict, bytes]] = []
        self.fail_first: dict[str, int] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def at(self, path: str) -> list[tuple[dict, bytes]]:
        with self.lock:
            return [(h, b) for p, h, b in self.posts if p == path]

    def wait_for(self, path: str, count: int, timeout: float = 60) -> list[tuple[dict, dict]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.at(path)
            if len(got) >= count:
                return [(h, json.loads(b)) for h, b in got]
            time.sleep(0.05)
        raise AssertionError(f"{path}: {len(self.at(path))} posts, not {count}, after {timeout} s")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server: Receiver = self.server  # type: ignore[assignment]
        with server.lock:
            server.posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            left = server.fail_first.get(self.path, 0)
            if left:
                server.fail_first[self.path] = left - 1
        self.send_response(500 if left else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def checked(cluster, headers: dict, body: bytes) -> dict:
    """The body, once its signature is the HMAC-SHA256 of it with the site's notify key (as docs/API.md says)."""
    key = (cluster.run_dir / "keys" / "notify.key").read_bytes()
    expected = "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-cm-signature"], expected)
    data = json.loads(body)
    assert headers["x-cm-event"] == data["event"] and headers["x-cm-delivery"] == data["delivery"]
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.shutdown()
    server.server_close()


def test_webhooks_are_signed_retried_and_a_receiver_that_is_down_is_shown(make_cluster, receiver):
    cluster = make_cluster(notify_urls=receiver.url("/site"), notify_retry_for=4)
    hook = receiver.url("/hook?token=s3cret")

    # begin and end of a command job, each signed, the end with the job's final view
    ran = cluster.submit("cmrun", "--notify", hook, "--notify-on", "begin,end", "-J", "hooked", "true")
    posts = receiver.wait_for("/hook?token=s3cret", 2)
    bodies = [checked(cluster, h, b) for h, b in receiver.at("/hook?token=s3cret")]
    assert [b["event"] for b in bodies] == ["begin", "end"]
    assert [b["job"]["id"] for b in bodies] == [ran, ran] and bodies[0]["job"]["state"] in ("DISPATCHING", "RUNNING")
    end = bodies[1]["job"]
    assert end["state"] == "COMPLETED" and end["name"] == "hooked" and end["exit_code"] == 0 and end["ended"]
    assert posts[0][0]["content-type"] == "application/json"
    receiver.wait_for("/site", 1)
    site = [checked(cluster, h, b) for h, b in receiver.at("/site")]
    assert [(b["event"], b["job"]["id"]) for b in site] == [("end", ran)]  # the site's list: every job's end

    # --notify-on fail: only a job that failed; a 500 is tried again, with the same delivery id
    receiver.fail_first["/fail"] = 2
    failing = cluster.submit("cmrun", "--notify", receiver.url("/fail"), "--notify-on", "fail", "sh", "-c", "exit 2")
    fine = cluster.submit("cmrun", "--notify", receiver.url("/fail"), "--notify-on", "fail", "true")
    tries = receiver.wait_for("/fail", 3)
    assert len({h["x-cm-delivery"] for h, _ in tries}) == 1
    data = checked(cluster, *receiver.at("/fail")[-1])
    assert data["event"] == "fail" and data["job"]["id"] == failing and data["job"]["state"] == "FAILED"
    cluster.wait_state(fine, "COMPLETED")
    assert "NOTIFY" not in cluster.cli("cminfo", str(failing)).stdout

    # a sync, and a submission through the HTTP API
    (cluster.data_dir / "gpu" / "n").mkdir(parents=True)
    (cluster.data_dir / "gpu" / "n" / "f").write_bytes(b"y" * 4096)
    synced = cluster.submit("cmsync", "--notify", receiver.url("/sync"), "gpu:/n", "cpu:/n")
    receiver.wait_for("/sync", 1)
    sync_end = checked(cluster, *receiver.at("/sync")[0])
    assert sync_end["job"]["id"] == synced and sync_end["job"]["transfer"]["bytes_done"] == 4096

    from cm.api.client import ApiError, Client

    with Client(str(cluster.run_dir / "api.sock")) as api:
        via_api = api.submit_command(["true"], notify=[receiver.url("/api")], cwd=str(cluster.home))
        receiver.wait_for("/api", 1)
        assert checked(cluster, *receiver.at("/api")[0])["job"]["id"] == via_api
        with pytest.raises(ApiError) as refused:
            api.submit_command(["true"], notify=["file:///etc/passwd"], cwd=str(cluster.home))
        assert refused.value.status == 400 and "only http:// and https://" in refused.value.message

    # only http(s), refused at submit with the reason
    proc = cluster.cli("cmrun", "--notify", "ftp://example.org/x", "true", check=False)
    assert proc.returncode == 1 and "only http:// and https:// URLs" in proc.stderr
    proc = cluster.cli("cmsync", "--notify", hook, "--notify-on", "finish", "gpu:/n", "cpu:/m", check=False)
    assert proc.returncode == 1 and "notify_on" in proc.stderr and "'finish'" in proc.stderr

    # a receiver that is down: tried again for CM_NOTIFY_RETRY_FOR seconds, then shown on the job; the head
    # answers meanwhile
    down = f"http://127.0.0.1:{free_port()}/down"
    lost = cluster.submit("cmrun", "--notify", down, "true")
    cluster.wait_state(lost, "COMPLETED")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        detail = cluster.cli("cminfo", str(lost)).stdout  # answered while the deliveries are retried
        if "NOTIFY" in detail:
            break
        time.sleep(0.2)
    line = next(line for line in detail.splitlines() if "NOTIFY" in line)
    tries = int(line.split(" failed after ")[1].split()[0])
    assert f"end to {down} failed after" in line and tries >= 2, line
    assert cluster.job(lost)["notify"].startswith("end to ")
    cluster.kill("headnode", signal.SIGTERM)
    cluster.start_head()
    cluster.wait_head()
    assert "failed after" in cluster.cli("cminfo", str(lost)).stdout  # stored on the job, not only in memory
