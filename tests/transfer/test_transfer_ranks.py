"""Several ranks share one sync job: each item is sent exactly once."""

import pytest

from cm.transfer import plan
from cm.transfer.receiver import TransferServer
from cm.transfer.tree import walk

from .conftest import CHUNK, Endpoint, assert_same_tree, finish, make_tree, spec_for, start_sender


@pytest.mark.parametrize("policy", plan.POLICIES)
def test_every_item_goes_to_exactly_one_rank(tmp_path, policy):
    make_tree(tmp_path, small_files=200)
    items = plan.make_items(walk(tmp_path), CHUNK)
    shares = [plan.share(items, r, 3, policy) for r in range(3)]
    assert sorted((it.entry.path, it.index) for s in shares for it in s) == sorted((it.entry.path, it.index) for it in items)
    assert all(shares)


def test_size_balanced_spreads_bytes_evenly():
    from cm.transfer.tree import Entry

    entries = [Entry(f"f{i}", "f", size, 0, 0o644) for i, size in enumerate([900, 500, 400, 300, 200, 100, 100])]
    items = plan.make_items(entries, 1 << 20)
    loads = [sum(it.weight for it in plan.share(items, r, 2, "size-balanced")) for r in range(2)]
    assert abs(loads[0] - loads[1]) <= 1000 + plan.FILE_COST


@pytest.mark.parametrize("policy", plan.POLICIES)
def test_two_ranks_with_two_receivers_cover_everything_once(roots, policy):
    src, dst_root = roots
    make_tree(src, small_files=600)
    servers = [TransferServer("127.0.0.1", 0, chunk_size=8 << 20) for _ in range(2)]
    try:
        endpoints = []
        for server in servers:
            server.start()
            server.register("job-7", "tok", dst_root, "/out")
            endpoints.append(Endpoint(server, "job-7", "tok", dst_root, "/out"))
        procs = [start_sender(spec_for(ep, src, rank=r, nranks=2, policy=policy)) for r, ep in enumerate(endpoints)]
        results = [finish(p) for p in procs]
    finally:
        for server in servers:
            server.stop()
    for r in results:
        assert r.returncode == 0, r.stderr
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    assert sum(r.report["bytes_sent"] for r in results) == total
    assert all(r.report["bytes_sent"] > 0 for r in results)
    assert_same_tree(src, dst_root / "out")


def test_two_ranks_publish_every_shared_chunked_file_run_after_run(roots):
    # both ranks open each file's .part and sidecar at about the same time, again and again: whichever makes
    # the sidecar, neither may wipe what the other recorded, and each file is published whole exactly once
    import os
    import shutil

    from .conftest import write

    src, dst_root = roots
    for k in range(8):
        write(src / f"big{k}.bin", os.urandom(6 * CHUNK + k))
    for run in range(4):
        shutil.rmtree(dst_root / "out", ignore_errors=True)
        servers = [TransferServer("127.0.0.1", 0, chunk_size=CHUNK) for _ in range(2)]
        try:
            endpoints = []
            for server in servers:
                server.start()
                server.register("job-9", "tok", dst_root, "/out")
                endpoints.append(Endpoint(server, "job-9", "tok", dst_root, "/out"))
            procs = [start_sender(spec_for(ep, src, rank=r, nranks=2, streams=3)) for r, ep in enumerate(endpoints)]
            results = [finish(p) for p in procs]
        finally:
            for server in servers:
                server.stop()
        for r in results:
            assert r.returncode == 0, r.stderr
        assert_same_tree(src, dst_root / "out")
        assert not [p.name for p in (dst_root / "out").iterdir() if p.name.startswith(".cm.")], f"run {run}"
