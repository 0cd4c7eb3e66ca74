"""From a job record to what others need of it: a node's share (RunJob.spec) and the scheduler's request."""

from __future__ import annotations

import hmac

from cm.head.records import Job, SlotRecord
from cm.head.resources import Demand, Request
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


def request_of(job: Job) -> Request:
    return Request(job["_id"], job.get("priority", 0), job["submitted"], job["time_limit"], demands_of(job))


def node_spec(job: Job, slot: SlotRecord, addrs: dict[str, str]) -> NodeJob:
    """What a node needs to run its share (``slot``) of the job's current run."""
    base = dict(run=job["runs"], rank=slot["rank"], name=job["name"], user=job["user"], uid=job["uid"],
                gid=job["gid"], time_limit=float(job["time_limit"]), cwd=job["cwd"])
    if job["kind"] == "command":
        nodelist = [s["node"] for s in job["slots"]]
        return CommandShare(**base, env=job["env"], argv=job["argv"], procs=job["procs"], nnodes=len(nodelist),
                            nodelist=nodelist, stdout=job["stdout"], stderr=job["stderr"], cpus=slot["cpus"])
    sync = job["sync"]
    options = sync["options"]
    transfer_id = f"{job['_id']}.{job['runs']}"
    # each run its own 128-bit data-plane token: one run's token opens no other run's transfer
    token = hmac.new(bytes.fromhex(sync["token"]), transfer_id.encode(), "sha256").hexdigest()[:32]
    if slot["role"] == "dst":
        return SyncDestination(**base, transfer=DestinationTransfer(
            transfer_id=transfer_id, token=token, dst_path=sync["dst"]["path"], owners=bool(options.get("owners"))))
    dst = next(s for s in job["slots"] if s["role"] == "dst" and s["rank"] == slot["rank"])
    host, _, port = addrs.get(dst["node"], ":0").rpartition(":")
    return SyncSource(**base, transfer=SourceTransfer(
        transfer_id=transfer_id, token=token, src_path=sync["src"]["path"], dst_host=host, dst_port=int(port or 0),
        rank=slot["rank"], nranks=sum(1 for s in job["slots"] if s["role"] == "src"),
        transport=sync.get("transport", "tcp"), policy=options.get("policy", "size-balanced"),
        delete=bool(options.get("delete")), dry_run=bool(options.get("dry_run")),
        checksum=bool(options.get("checksum")), exclude=list(options.get("exclude") or ()),
        bwlimit=options.get("bwlimit"), streams=options.get("streams", 4), chunk_size=options.get("chunk_size", 64 << 20),
        owners=bool(options.get("owners")), hard_links=options.get("hard_links", True),
        xattrs=options.get("xattrs", True), acls=options.get("acls", True)))
