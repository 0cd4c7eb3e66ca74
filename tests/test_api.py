"""The HTTP API: a real head, a real database, real HTTP over the Unix socket and over TCP with tokens."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from cm import ApiError, Client
from conftest import run_as
from test_multiuser import in_child_as, users  # noqa: F401  (a fixture: two real users and an operator)


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
