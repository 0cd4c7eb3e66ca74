"""Many compute nodes in one process, speaking the real protocol to a real head.

For scale tests: each simulated node has its own DEALER socket (its own
connection and routing id, CurveZMQ like a real node), says HELLO, sends
heartbeats at the configured interval, and answers RunJob with JobStarted
and, after `job_seconds` (never, if None), JobEnded. Nothing is executed.

    python -m cm.cluster.simulator --nodes 1000 --partition sim --run-dir RUN --head-port PORT
"""

from __future__ import annotations

import argparse
import heapq
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import zmq

from cm import __version__
from cm.protocol import (
    Ack,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    JobEnded,
    JobStarted,
    KillJob,
    ProtocolError,
    RunJob,
    Welcome,
    decode,
    encode,
    new_id,
)


@dataclass
class SimNode:
    name: str
    sock: zmq.Socket
    incarnation: str = field(default_factory=new_id)
    welcomed: bool = False
    running: set[tuple[int, int, str, int]] = field(default_factory=set)  # shares: (job, run, role, rank)

    def beat(self) -> Heartbeat:
        """A heartbeat naming its shares, as a real node's does (the head checks them against its slots)."""
        return Heartbeat(node=self.name, running=sorted({s[0] for s in self.running}), shares=sorted(self.running))


class Simulator:
    def __init__(self, names: list[str], partition: str, head: str, run_dir: str | None, cpus: int = 4,
                 mem_mb: int = 16000, interval: float = 1.0, job_seconds: float | None = 0.0):
        self.partition, self.cpus, self.mem_mb = partition, cpus, mem_mb
        self.interval, self.job_seconds = interval, job_seconds
        self.ctx = zmq.Context.instance()
        self.nodes: dict[zmq.Socket, SimNode] = {}
        for name in names:
            sock = self.ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.identity = name.encode()
            if run_dir:
                from cm.keys import secure_client

                secure_client(sock, run_dir, name)
            sock.connect(head)
            self.nodes[sock] = SimNode(name, sock)
        self.ends: list[tuple[float, str, tuple[int, int, str, int]]] = []  # (when, node, share)
        self.by_name = {n.name: n for n in self.nodes.values()}
        self.stop = threading.Event()

    def hello(self, node: SimNode) -> Hello:
        return Hello(node=node.name, partition=self.partition, cpus=self.cpus, mem_mb=self.mem_mb,
                     version=__version__, running=sorted({s[0] for s in node.running}), transfer_addr=f"{node.name}:0",
                     data_root="/nonexistent", incarnation=node.incarnation, shares=sorted(node.running))

    def run(self) -> None:
        poller = zmq.Poller()
        for sock in self.nodes:
            poller.register(sock, zmq.POLLIN)
        # spread heartbeats over the interval like independent machines would
        count = len(self.nodes)
        due = [(time.monotonic() + self.interval * i / max(count, 1), i, n) for i, n in enumerate(self.nodes.values())]
        heapq.heapify(due)
        while not self.stop.is_set():
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, i, node = heapq.heappop(due)
                msg = node.beat() if node.welcomed else self.hello(node)
                self.send(node, msg)
                heapq.heappush(due, (now + (self.interval if node.welcomed else 0.5), i, node))
            while self.ends and self.ends[0][0] <= now:
                _, name, share = heapq.heappop(self.ends)
                node = self.by_name[name]
                if share in node.running:
                    node.running.discard(share)
                    job_id, run, role, rank = share
                    self.send(node, JobEnded(job_id=job_id, node=name, run=run, state="COMPLETED", exit_code=0,
                                             role=role, rank=rank))
            wait = min([due[0][0] if due else now + 0.1] + ([self.ends[0][0]] if self.ends else [])) - now
            for sock, _ in poller.poll(max(0, int(wait * 1000))):
                node = self.nodes[sock]
                while True:
                    try:
                        payload = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self.on_message(node, decode(payload))
                    except ProtocolError:
                        pass

    @staticmethod
    def send(node: SimNode, msg) -> None:
        try:
            node.sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected yet: like a real node, it says it again later

    def on_message(self, node: SimNode, msg) -> None:
        if isinstance(msg, Welcome):
            node.welcomed = True
        elif isinstance(msg, Error):
            if msg.code == ErrorCode.UNKNOWN_NODE:
                node.welcomed = False
        elif isinstance(msg, RunJob):
            self.send(node, Ack(ref=msg.id))
            spec = msg.spec
            share = (msg.job_id, spec.run, spec.role, spec.rank)
            if share not in node.running:
                node.running.add(share)
                if self.job_seconds is not None:
                    heapq.heappush(self.ends, (time.monotonic() + self.job_seconds, node.name, share))
            self.send(node, JobStarted(job_id=share[0], node=node.name, run=share[1], role=share[2], rank=share[3]))
        elif isinstance(msg, KillJob):
            self.send(node, Ack(ref=msg.id))
            for share in sorted(node.running):
                job_id, run, role, rank = share
                if job_id == msg.job_id and msg.run in (0, run) and msg.role in ("", role) and msg.rank in (-1, rank):
                    node.running.discard(share)
                    self.send(node, JobEnded(job_id=job_id, node=node.name, run=run, state=msg.state, exit_code=143,
                                             role=role, rank=rank))

    def close(self) -> None:
        for sock in self.nodes:
            sock.close(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cm.cluster.simulator")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--partition", default="sim")
    parser.add_argument("--prefix", default="sim-")
    parser.add_argument("--cpus", type=int, default=4)
    parser.add_argument("--head", default="tcp://127.0.0.1:7817")
    parser.add_argument("--run-dir", default=os.environ.get("CM_RUN_DIR"), help="for the CurveZMQ keys")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--job-seconds", type=float, default=-1, help="how long a job runs; <0: until killed")
    args = parser.parse_args(argv)
    if args.run_dir:
        from cm.keys import ensure_keys

        ensure_keys(args.run_dir, ["node"])  # the shared node key stands in for each simulated node's
    names = [f"{args.prefix}{i}" for i in range(1, args.nodes + 1)]
    sim = Simulator(names, args.partition, args.head, args.run_dir, cpus=args.cpus, interval=args.interval,
                    job_seconds=None if args.job_seconds < 0 else args.job_seconds)
    signal.signal(signal.SIGTERM, lambda *_: sim.stop.set())
    try:
        sim.run()
    except KeyboardInterrupt:
        pass
    finally:
        sim.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
