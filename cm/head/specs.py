"""From a job record to what others need of it: a node's share (RunJob.spec) and the scheduler's request."""

from __future__ import annotations

from cm.head.records import Job, SlotRecord
from cm.head.resources import Demand, Request, Writes
from cm.keys import data_plane_key
from cm.protocol import CommandShare, DestinationTransfer, NodeJob, SourceTransfer, SyncDestination, SyncSource


def demands_of(job: Job) -> tuple[Demand, ...]:
    if job["kind"] == "sync":
        sync = job["sync"]
        n = job["nodes"]
        return (
            Demand("src", n, 1, 0, partition=sync["src"].get("partition", ""), node=sync["src"].get("node", "")),
            Demand("dst", n, 1, 0, partition=sync["dst"].get("partition", ""), node=sync["dst"].get("node", "")),
        )
    return (Demand("run", job["nodes"], job["cpus"], job["mem_mb"], partition=job["partition"]),)


def writes_of(job: Job) -> Writes | None:
    """Where a sync job writes (a dry run writes nothing), for the scheduler's DestinationBusy."""
    if job["kind"] != "sync" or job["sync"]["options"].get("dry_run"):
        return None
    dst = job["sync"]["dst"]
    return Writes(dst.get("partition", ""), dst.get("node", ""), dst["path"])


def request_of(job: Job) -> Request:
    return Request(job["_id"], job.get("priority", 0), job["submitted"], job["time_limit"], demands_of(job),
                   writes_of(job))


def node_spec(job: Job, slot: SlotRecord, addrs: dict[str, str], transfer_secret: bytes) -> NodeJob:
    """What a node needs to run its share (``slot``) of the job's current run (a sync's data-plane key
    derived from the head's transfer_secret)."""
    base = dict(run=job["runs"], rank=slot["rank"], name=job["name"], user=job["user"], uid=job["uid"],
                gid=job["gid"], time_limit=float(job["time_limit"]), cwd=job["cwd"])
    if job["kind"] == "command":
        nodelist = [s["node"] for s in job["slots"]]
        return CommandShare(**base, env=job["env"], argv=job["argv"], procs=job["procs"], nnodes=len(nodelist),
                            nodelist=nodelist, stdout=job["stdout"], stderr=job["stderr"], cpus=slot["cpus"])
    sync = job["sync"]
    options = sync["options"]
    transfer_id = f"{job['_id']}.{job['runs']}"
    # each run its own 128-bit data-plane key: one run's key opens no other run's transfer (a job stored before
    # nonces were has none: its key still comes from the head's secret and its transfer id)
    token = data_plane_key(transfer_secret, sync.get("nonce", ""), transfer_id)
    if slot["role"] == "dst":
        return SyncDestination(**base, transfer=DestinationTransfer(
            transfer_id=transfer_id, token=token, dst_path=sync["dst"]["path"], owners=bool(options.get("owners"))))
    dst = next(s for s in job["slots"] if s["role"] == "dst" and s["rank"] == slot["rank"])
    host, _, port = addrs.get(dst["node"], ":0").rpartition(":")
    nranks = sum(1 for s in job["slots"] if s["role"] == "src")
    bwlimit = options.get("bwlimit")  # the job's: each of its senders gets its share
    return SyncSource(**base, transfer=SourceTransfer(
        transfer_id=transfer_id, token=token, src_path=sync["src"]["path"], dst_host=host, dst_port=int(port or 0),
        rank=slot["rank"], nranks=nranks,
        transport=sync.get("transport", "tcp"), policy=options.get("policy", "size-balanced"),
        delete=bool(options.get("delete")), dry_run=bool(options.get("dry_run")),
        checksum=bool(options.get("checksum")), exclude=list(options.get("exclude") or ()),
        bwlimit=bwlimit / nranks if bwlimit else None, streams=options.get("streams", 4), chunk_size=options.get("chunk_size", 64 << 20),
        owners=bool(options.get("owners")), hard_links=options.get("hard_links", True),
        xattrs=options.get("xattrs", True), acls=options.get("acls", True)))
