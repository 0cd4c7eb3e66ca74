"""Values past 32 bits (a sync of a file over 4 GiB) through the database, every view of the job and a head
restart: MongoDB hands such numbers back as bson.int64.Int64, which no view may carry to its client."""

from __future__ import annotations

import json
import os

from cm import Client

SIZE = (4 << 30) + 4099  # over 2^32: no 32-bit counter holds it


def sparse(path, size: int) -> None:
    """A sparse file of size bytes, with a few real bytes at both ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"head of the file")
        f.truncate(size)
        f.seek(size - 4)
        f.write(b"tail")


def check_views(cluster, job_id: int) -> None:
    """Every way of looking at the job answers, with the size exact, and the head stays up."""
    for argv in (("cminfo",), ("cminfo", "--all"), ("cminfo", str(job_id)), ("cminfo", "--all", "--json")):
        cluster.cli(*argv)
    view = cluster.job(job_id)
    assert view["state"] == "COMPLETED", view
    assert (view["transfer"]["bytes_total"], view["transfer"]["bytes_done"]) == (SIZE, SIZE), view["transfer"]
    listed = {j["id"]: j for j in json.loads(cluster.cli("cminfo", "--all", "--json").stdout)["jobs"]}
    assert listed[job_id]["transfer"]["bytes_total"] == SIZE
    api = Client(str(cluster.run_dir / "api.sock"), timeout=30)
    assert api.status(job_id)["transfer"]["bytes_total"] == SIZE
    assert any(j["id"] == job_id for j in api.jobs(all=True))
    cluster.cli("cminfo")  # still answering after all of it


def test_a_sync_of_a_file_over_4_gib_is_shown_everywhere_and_survives_a_head_restart(make_cluster):
    cluster = make_cluster("gpu:1,cpu:1", nodes=2)
    src = cluster.data_dir / "gpu" / "big.bin"
    dst = cluster.data_dir / "cpu" / "copy" / "big.bin"  # a file lands in the directory DST
    sparse(src, SIZE)
    try:
        job_id = cluster.submit("cmsync", "--wait", "gpu:/big.bin", "cpu:/copy", timeout=300)
        assert dst.stat().st_size == SIZE
        with open(dst, "rb") as f:
            assert f.read(16) == b"head of the file"
            f.seek(SIZE - 4)
            assert f.read() == b"tail"
        dst.unlink()  # the copy may not be sparse: give the space back at once
        check_views(cluster, job_id)
        # a restarted head reads the job back from the database (recent jobs, --all, one job)
        cluster.kill("headnode")
        cluster.start_head()
        cluster.wait_head()
        check_views(cluster, job_id)
        assert "Traceback" not in cluster.logfile("headnode").read_text(errors="replace")
    finally:
        for path in (src, dst):
            if os.path.exists(path):
                os.unlink(path)
