"""Which compute nodes exist, whether they are alive, and what they offer.

Liveness lives in memory (a heartbeat is not worth a database write); a node's
description and its UP/DOWN changes are saved so a restarted head knows the
cluster's shape before the nodes call back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cm import store
from cm.logs import event
from cm.protocol import Hello
from cm.states import NodeState

log = logging.getLogger("cm.head.registry")


@dataclass
class NodeInfo:
    name: str
    partition: str
    cpus: int
    mem_mb: int
    transfer_addr: str = ""
    data_root: str = ""
    version: str = ""
    incarnation: str = ""
    alive: bool = False
    last_seen: float = 0.0
    drain: bool = False
    reason: str = ""


class Registry:
    def __init__(self, heartbeat_timeout: float, db=store, started: float | None = None):
        self.timeout = heartbeat_timeout
        self.db = db  # all_nodes() and save_node(name, **fields): cm.store, or one in memory in the unit tests
        self.nodes: dict[str, NodeInfo] = {}
        self.started = time.monotonic() if started is None else started
        self.claimed = False  # whether nodes silent since the head started were declared DOWN

    def load(self) -> None:
        """Known nodes from the database; none is alive until it calls back."""
        for doc in self.db.all_nodes():
            self.nodes[doc["_id"]] = NodeInfo(
                name=doc["_id"],
                partition=doc["partition"],
                cpus=doc["cpus"],
                mem_mb=doc["mem_mb"],
                transfer_addr=doc.get("transfer_addr", ""),
                data_root=doc.get("data_root", ""),
                version=doc.get("version", ""),
                incarnation=doc.get("incarnation", ""),
                drain=doc.get("drain", False),
                reason=doc.get("reason", ""),
            )

    def hello(self, msg: Hello, now: float) -> tuple[NodeInfo, bool]:
        """Register or refresh a node. Returns the node and whether its daemon restarted."""
        node = self.nodes.get(msg.node)
        restarted = node is not None and node.incarnation != msg.incarnation
        if node is None:
            node = self.nodes[msg.node] = NodeInfo(msg.node, msg.partition, msg.cpus, msg.mem_mb)
        node.partition, node.cpus, node.mem_mb = msg.partition, msg.cpus, msg.mem_mb
        node.transfer_addr, node.data_root, node.version = msg.transfer_addr, msg.data_root, msg.version
        node.incarnation = msg.incarnation
        was_alive = node.alive
        node.alive, node.last_seen = True, now
        self.db.save_node(
            msg.node,
            partition=msg.partition,
            cpus=msg.cpus,
            mem_mb=msg.mem_mb,
            transfer_addr=msg.transfer_addr,
            data_root=msg.data_root,
            version=msg.version,
            incarnation=msg.incarnation,
            state="UP",
            last_seen=time.time(),
        )
        if not was_alive:
            event(log, "node up", node=msg.node, partition=msg.partition, cpus=msg.cpus, mem_mb=msg.mem_mb)
        return node, restarted

    def seen(self, name: str, now: float) -> bool:
        """A heartbeat from name; False if the node must say hello first."""
        node = self.nodes.get(name)
        if node is None or not node.alive:
            return False
        node.last_seen = now
        return True

    def expire(self, now: float) -> list[NodeInfo]:
        """Mark nodes silent for longer than the timeout DOWN; return them."""
        # after a head restart every node gets a full timeout to call back
        if now - self.started < self.timeout:
            return []
        down = []
        for node in self.nodes.values():
            if node.alive and now - node.last_seen > self.timeout:
                node.alive = False
                down.append(node)
            elif not node.alive and not node.last_seen and not self.claimed:
                down.append(node)  # never called back after this head started: its jobs are lost too
        self.claimed = True
        for node in down:
            self.db.save_node(node.name, state="DOWN")
            event(log, "node down", logging.WARNING, node=node.name,
                  silent_for=round(now - (node.last_seen or self.started), 2))
        return down

    def set_drain(self, name: str, drain: bool, reason: str = "") -> NodeInfo:
        node = self.nodes.get(name)
        if node is None:
            raise KeyError(name)
        node.drain, node.reason = drain, reason
        self.db.save_node(name, drain=drain, reason=reason)
        return node

    def state_of(self, node: NodeInfo, cpus_used: int) -> NodeState:
        if not node.alive:
            return NodeState.DOWN if node.last_seen or time.monotonic() - self.started >= self.timeout else NodeState.UNKNOWN
        if node.drain:
            return NodeState.DRAIN
        if cpus_used == 0:
            return NodeState.IDLE
        return NodeState.ALLOCATED if cpus_used >= node.cpus else NodeState.MIXED
