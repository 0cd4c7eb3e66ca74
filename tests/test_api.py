"""The HTTP API: a real head, a real database, real HTTP over the Unix socket and over TCP with tokens."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from cm import ApiError, Client
import test_multiuser
from test_multiuser import in_child_as

users = test_multiuser.users  # the fixture: real users alice and bob (and an operator), made with useradd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local(cluster) -> Client:
    return Client(str(cluster.run_dir / "api.sock"), timeout=30)


def raw(path, data: bytes, wait: float = 5.0) -> bytes:
    """Send bytes as they are to the API's Unix socket; what came back before it closed (or wait passed)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(wait)
        s.connect(str(path))
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return got


def tree(root) -> None:
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        (root / f"f{i}").write_bytes(os.urandom(1000 * (i + 1)))
    (root / "sub" / "deep").write_bytes(b"x" * 70000)


def test_jobs_live_their_whole_life_over_the_unix_socket(cluster):
    tree(cluster.data_dir / "gpu" / "proj")
    api = local(cluster)
    job_id = api.submit_sync("gpu:/proj", "cpu:/copy", labels={"workflow": "w1", "namespace": "ns"})
    view = api.wait(job_id, timeout=60)
    assert view["state"] == "COMPLETED", view
    assert (cluster.data_dir / "cpu" / "copy" / "sub" / "deep").read_bytes() == b"x" * 70000
    t = view["transfer"]
    assert (t["files_done"], t["files_total"], t["bytes_done"]) == (6, 6, 15000 + 70000)
    assert t["rate"] > 0 and t["started"] <= t["ended"] and t["files_skipped"] == 0 and t["retries"] == 0
    assert view["labels"] == {"workflow": "w1", "namespace": "ns"}
    assert [j["id"] for j in api.jobs(labels={"workflow": "w1"})] == [job_id]
    assert api.jobs(labels={"workflow": "other"}) == []
    # the same sync again skips every file
    again = api.wait(api.submit_sync("gpu:/proj", "cpu:/copy"), timeout=60)
    assert again["transfer"]["files_skipped"] == 6 and again["transfer"]["bytes_done"] == 0, again["transfer"]

    command = api.submit_command(["sleep", "30"], labels={"workflow": "w1"})
    with pytest.raises(ApiError) as active:
        api.delete(command)
    assert active.value.status == 409
    assert api.cancel(command) in ("cancelled", "cancelling")
    assert api.wait(command, timeout=30)["state"] == "CANCELLED"
    assert {j["id"] for j in api.jobs(labels={"workflow": "w1"})} == {job_id, command}
    assert [j["id"] for j in api.jobs(state="CANCELLED")] == [command]

    api.delete(job_id)
    with pytest.raises(ApiError) as gone:
        api.status(job_id)
    assert gone.value.status == 404
    assert job_id not in {j["id"] for j in api.jobs(all=True)}
    assert {n["name"] for n in api.nodes()} == set(cluster.node_states())


def test_over_tcp_only_a_valid_token_gets_in_and_a_revoked_one_is_refused(make_cluster):
    port = free_port()
    cluster = make_cluster(api_port=port)
    url, cert = f"https://127.0.0.1:{port}", str(cluster.run_dir / "api.crt")
    for token in (None, "", "cm2_wrong", "cm2_0.0.0.AAAA", "x" * 5000):
        with pytest.raises(ApiError) as refused:
            Client(url, token=token, cafile=cert).jobs()
        assert refused.value.status in (401, 431), token
    assert Client(url, cafile=cert).version()["api_versions"] == ["v1"]  # public paths need no token
    token = cluster.cli("cmtoken").stdout.strip()
    assert cluster.cli("cmtoken").stdout.strip() == token  # asked twice: the same working token
    api = Client(url, token=token, cafile=cert)
    tree(cluster.data_dir / "gpu" / "proj")
    job_id = api.submit_sync("gpu:/proj", "cpu:/copy", checksum=True)
    assert api.wait(job_id, timeout=60)["state"] == "COMPLETED"
    api.delete(job_id)
    command = api.submit_command(["sleep", "30"])
    assert api.cancel(command) in ("cancelled", "cancelling")
    assert api.wait(command, timeout=30)["state"] == "CANCELLED"
    assert api.status(command)["user"] == "root"
    cluster.cli("cmtoken", "--revoke", "root")
    with pytest.raises(ApiError) as revoked:
        api.jobs()
    assert revoked.value.status == 401
    fresh = cluster.cli("cmtoken").stdout.strip()
    assert fresh != token and Client(url, token=fresh, cafile=cert).status(command)["state"] == "CANCELLED"


def test_another_users_job_is_403_to_cancel_and_delete(cluster, users):
    sock = str(cluster.run_dir / "api.sock")
    alice, bob = users["alice"], users["bob"]
    workdir = cluster.home / "alice"  # hers: a shared /tmp/cmlogs/1 of another run would fail the job at once
    workdir.mkdir()
    os.chown(workdir, alice.pw_uid, alice.pw_gid)

    def submit():
        return Client(sock).submit_command(["sleep", "30"], cwd=str(workdir))

    def try_to(action, job_id):
        def act():
            try:
                getattr(Client(sock), action)(job_id)
                return 0
            except ApiError as exc:
                return exc.status
        return act

    job_id = in_child_as(alice, submit)
    assert Client(sock).status(job_id)["user"] == alice.pw_name  # the kernel's word, not the body's
    assert in_child_as(bob, try_to("cancel", job_id)) == 403
    assert in_child_as(bob, try_to("delete", job_id)) == 403
    assert in_child_as(alice, try_to("cancel", job_id)) == 0
    Client(sock).wait(job_id, timeout=30)
    # ownership is checked before state: bob is not told that alice's job has finished
    assert in_child_as(bob, try_to("cancel", job_id)) == 403
    assert in_child_as(bob, try_to("delete", job_id)) == 403
    assert in_child_as(alice, try_to("delete", job_id)) == 0
    assert in_child_as(bob, try_to("status", job_id)) == 404


def test_a_long_poll_returns_when_the_job_ends_and_on_time_when_it_does_not(cluster):
    api = local(cluster)
    short = api.submit_command(["sleep", "1"])
    view = api.status(short, wait=60)
    assert view["state"] == "COMPLETED"  # on the end, not on the timeout (how soon: bench/bench_waits.py)
    long = api.submit_command(["sleep", "60"])
    for wait, low in ((0.7, 0.65), (0, 0)):
        started = time.monotonic()
        assert api.status(long, wait=wait)["state"] in ("PENDING", "DISPATCHING", "RUNNING")
        took = time.monotonic() - started
        assert low <= took < 30, (wait, took)  # on time, not when the job ends
    api.cancel(long)
    assert api.status(long, wait=-1)["state"] == "CANCELLED"  # negative: as long as allowed, ends early


def test_a_repeated_idempotency_key_returns_the_first_job(cluster):
    api = local(cluster)
    first = api.submit_command(["true"], idempotency_key="run-42")
    assert api.submit_command(["true"], idempotency_key="run-42") == first
    api.wait(first, timeout=30)
    assert api.submit_command(["sleep", "5"], idempotency_key="run-42") == first  # finished: still the same job
    assert api.submit_command(["true"], idempotency_key="run-43") != first
    assert len([j for j in api.jobs(all=True) if j["id"] == first]) == 1


def test_garbage_and_oversized_requests_get_4xx_and_the_head_keeps_running(make_cluster):
    cluster = make_cluster(api_timeout=1)
    path = cluster.run_dir / "api.sock"
    cases = {
        b"GARBAGE\r\n\r\n": b"400",
        b"\x00\xff\x10junk\r\n\r\n": b"400",
        b"GET / HTTP/9.9\r\n\r\n": b"505",
        b"GET /v1/jobs HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n": b"431",
        b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n": b"413",
        b"POST /v1/jobs HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n": b"411",
        b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope": b"400",
        b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]": b"422",
        b'POST /v1/jobs HTTP/1.1\r\nContent-Length: 35\r\n\r\n{"type":"command","argv":["x"],"a":1}'[:-2] + b"}": b"422",
        b"GET /v1/jobs/99999999 HTTP/1.1\r\n\r\n": b"404",
        b"GET /v1/jobs/abc HTTP/1.1\r\n\r\n": b"404",
        b"GET /v1/jobs/1?wait=nan HTTP/1.1\r\n\r\n": b"400",
        b"PUT /v1/jobs HTTP/1.1\r\n\r\n": b"405",
        b"POST /v1/admin/explode HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}": b"404",
        b"POST /v1/admin/drain HTTP/1.1\r\nContent-Length: 15\r\n\r\n{\"node\": \"nix\"}": b"404",
        b"GET /v1/jobs HTTP/1.1\r\nHost: x": b"408",  # slow loris: the rest never comes
    }
    for request, status in cases.items():
        answer = raw(path, request)
        assert answer.startswith(b"HTTP/1.1 " + status), (request[:60], answer[:200])
        if status != b"404" or b"admin" not in request:
            assert b'"error"' in answer
    for _ in range(50):  # connections opened and dropped at once
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
    api = local(cluster)
    assert api._call("GET", "/healthz") == {"alive": True}
    assert api.wait(api.submit_command(["true"]), timeout=30)["state"] == "COMPLETED"


def test_health_readiness_version_metrics_and_openapi(cluster):
    api = local(cluster)
    assert api._call("GET", "/healthz") == {"alive": True}
    assert api._call("GET", "/readyz") == {"ready": True}
    doc = api._call("GET", "/openapi.json")
    assert doc["openapi"].startswith("3.") and "/v1/jobs/{id}" in doc["paths"]
    assert doc["components"]["schemas"]["SyncJob"]["properties"]["checksum"]["type"] == "boolean"
    api.wait(api.submit_command(["true"]), timeout=30)
    tree(cluster.data_dir / "gpu" / "m")
    api.wait(api.submit_sync("gpu:/m", "cpu:/m"), timeout=60)
    text = api._call("GET", "/metrics")
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert lines['cm_jobs{state="COMPLETED"}'] == "2"
    assert lines['cm_nodes{state="IDLE"}'] == "4"
    assert lines["cm_sync_bytes_moved_total"] == str(85000) and lines["cm_sync_files_moved_total"] == "6"
    assert float(lines["cm_scheduler_pass_seconds"]) > 0
    assert int(lines['cm_api_requests_total{method="POST",code="201"}']) == 2


def test_readiness_says_503_when_the_database_is_away(make_cluster, tmp_path):
    from cm.cluster.db import DatabaseServer

    own = DatabaseServer()
    uri = own.start(tmp_path / "db", log_path=tmp_path / "db.log")
    try:
        cluster = make_cluster(mongodb_uri=uri)
        api = local(cluster)
        assert api._call("GET", "/readyz") == {"ready": True}
        own.stop()
        with pytest.raises(ApiError) as away:
            api._call("GET", "/readyz")
        assert away.value.status == 503
        assert api._call("GET", "/healthz") == {"alive": True}
    finally:
        own.stop()


def test_a_thousand_idle_long_polls_are_held_and_all_answered(cluster):
    job_id = local(cluster).submit_command(["sleep", "3"])
    results = []

    def poll():
        try:
            results.append(Client(str(cluster.run_dir / "api.sock"), timeout=60).status(job_id, wait=30)["state"])
        except ApiError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=poll) for _ in range(300)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == ["COMPLETED"] * 300, {r for r in results}


def test_a_client_that_leaves_a_long_poll_is_forgotten_by_the_head(cluster):
    api = local(cluster)
    held = api.submit_command(["true"], hold=True)

    def polls() -> int:
        text = api._call("GET", "/metrics")
        return int(next(line for line in text.splitlines() if line.startswith("cm_api_long_polls ")).split()[1])

    socks = []
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(cluster.run_dir / "api.sock"))
        s.sendall(f"GET /v1/jobs/{held}?wait=60 HTTP/1.1\r\n\r\n".encode())
        socks.append(s)
    deadline = time.monotonic() + 5
    while polls() < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert polls() == 20
    for s in socks:
        s.close()
    deadline = time.monotonic() + 5
    while polls() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert polls() == 0
    assert api.status(held)["state"] == "HELD"


def test_schemathesis_finds_no_server_error_against_the_openapi_document(make_cluster, users):
    """Property-based requests from /openapi.json (as an ordinary user, so generated jobs run as her), ~60 s."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    st = Path(sys.executable).parent / "st"
    if not st.exists() and shutil.which("st") is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    port = free_port()
    cluster = make_cluster(api_port=port)
    ok, data = test_multiuser.ask(cluster, users["alice"], "token")
    assert ok, data
    proc = subprocess.run(
        [str(st), "run", f"https://127.0.0.1:{port}/openapi.json", "--tls-verify", str(cluster.run_dir / "api.crt"),
         "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance",
         "-H", f"Authorization: Bearer {data['token']}", "--max-time", "50", "--max-examples", "40",
         "--workers", "1", "--generation-database", "none", "--no-color",
         "--request-timeout", "65"],  # a long poll on a held job lasts the longest wait allowed, 60 s
        capture_output=True, text=True, timeout=400, cwd=str(cluster.home))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert local(cluster)._call("GET", "/healthz") == {"alive": True}


def doc_blocks(kind: str) -> list[str]:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "API.md").read_text()
    return [block.split("\n", 1)[1] for block in text.split("```")[1::2] if block.startswith(kind + "\n")]


def test_the_examples_in_docs_api_md_run(make_cluster):
    import subprocess
    import sys

    port = free_port()
    cluster = make_cluster(api_port=port)
    tree(cluster.data_dir / "gpu" / "proj")
    env = {**os.environ, "CM_RUN_DIR": str(cluster.run_dir), "CM_API_PORT": str(port),
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    env.pop("CM_CONFIG", None)
    shells, pythons = doc_blocks("sh"), doc_blocks("python")
    assert len(shells) == 2 and len(pythons) == 1
    outputs = []
    for block in shells:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], capture_output=True, text=True, env=env,
                              timeout=120, cwd=str(cluster.home))
        assert proc.returncode == 0, block + proc.stdout + proc.stderr
        outputs.append(proc.stdout)
    assert '"state":"COMPLETED"' in outputs[0] and outputs[0].rstrip().endswith("204")
    assert outputs[1].startswith("401\n") and 'cm_jobs{state="CANCELLED"} 1' in outputs[1]
    for block in pythons:
        proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, env=env, timeout=120,
                              cwd=str(cluster.home))
        assert proc.returncode == 0, block + proc.stdout + proc.stderr
        assert proc.stdout.startswith("COMPLETED ")


def test_labels_from_the_commands_are_stored_shown_and_filter_cminfo(cluster):
    tagged = cluster.submit("cmrun", "--label", "workflow=w7", "--label", "namespace=climate", "true")
    plain = cluster.submit("cmrun", "true")
    tree(cluster.data_dir / "gpu" / "p")
    synced = cluster.submit("cmsync", "--label", "workflow=w7", "gpu:/p", "cpu:/p")
    for job_id in (tagged, plain, synced):
        cluster.wait_state(job_id, "COMPLETED", timeout=60)
    listed = json.loads(cluster.cli("cminfo", "--json", "--label", "workflow=w7").stdout)["jobs"]
    assert sorted(j["id"] for j in listed) == [tagged, synced]
    both = json.loads(cluster.cli("cminfo", "--json", "--label", "workflow=w7", "--label", "namespace=climate").stdout)
    assert [j["id"] for j in both["jobs"]] == [tagged]
    assert cluster.job(tagged)["labels"] == {"workflow": "w7", "namespace": "climate"}
    detail = cluster.cli("cminfo", str(tagged)).stdout
    assert "LABELS: namespace=climate" in detail and "workflow=w7" in detail
    assert "files" in cluster.cli("cminfo", str(synced)).stdout  # TRANSFER line with skipped and retries
    for bad in (["cmrun", "--label", "novalue", "true"], ["cmrun", "--label", "bad.key=x", "true"],
                ["cminfo", "--label", "novalue"]):
        proc = cluster.cli(*bad, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and "label" in proc.stderr, bad


def test_admin_operations_follow_cmcontrols_rules(cluster, users):
    sock = str(cluster.run_dir / "api.sock")
    root = Client(sock)
    job_id = root.submit_command(["sleep", "30"], hold=True)
    assert root.admin("release", job_id=job_id)["state"] == "PENDING"
    assert root.admin("priority", job_id=job_id, value="high")["priority"] == 100
    node = root.nodes()[0]["name"]
    assert root.admin("drain", node=node, reason="disk")["drain"] is True
    assert next(n for n in root.nodes() if n["name"] == node)["state"] == "DRAIN"
    root.admin("resume", node=node)
    root.admin("block", user=users["alice"].pw_name)

    def alice_tries():
        api, out = Client(sock), {}
        for name, call in (("submit", lambda: api.submit_command(["true"], cwd="/tmp")),
                           ("drain", lambda: api.admin("drain", node=node)),
                           ("unblock", lambda: api.admin("unblock", user="cmt_alice")),
                           ("priority", lambda: api.admin("priority", job_id=job_id, value=5)),
                           ("hold", lambda: api.admin("hold", job_id=job_id))):
            try:
                call()
                out[name] = 0
            except ApiError as exc:
                out[name] = exc.status
        return out

    assert in_child_as(users["alice"], alice_tries) == {"submit": 403, "drain": 403, "unblock": 403,
                                                        "priority": 403, "hold": 403}
    root.admin("unblock", user=users["alice"].pw_name)
    with pytest.raises(ApiError) as missing:
        root.admin("priority", job_id=job_id)
    assert missing.value.status == 422
    ok, error = test_multiuser.ask(cluster, users["alice"], "token", revoke="root")
    assert not ok and "administrator" in error  # revoking someone else's token is for admins
    root.cancel(job_id)
