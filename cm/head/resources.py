"""What a job asks for and what a node has: the vocabulary of the scheduler."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class NodeView:
    """A node as the scheduler sees it. `usable` is alive and not draining."""

    name: str
    partition: str
    cpus: int
    mem_mb: int
    cpus_used: int = 0
    mem_used: int = 0
    usable: bool = True
    sort_key: tuple = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.sort_key:
            self.sort_key = tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", self.name))

    @property
    def cpus_free(self) -> int:
        return self.cpus - self.cpus_used

    @property
    def mem_free(self) -> int:
        return self.mem_mb - self.mem_used

    def fits(self, cpus: int, mem_mb: int) -> bool:
        return self.usable and self.cpus_free >= cpus and self.mem_free >= mem_mb

    def take(self, cpus: int, mem_mb: int) -> None:
        self.cpus_used += cpus
        self.mem_used += mem_mb

    def give(self, cpus: int, mem_mb: int) -> None:
        self.cpus_used -= cpus
        self.mem_used -= mem_mb


@dataclass(frozen=True)
class Demand:
    """`count` nodes from a partition (or exactly the named node), each with cpus and mem."""

    role: str  # run, src or dst
    count: int
    cpus: int
    mem_mb: int
    partition: str = ""
    node: str = ""

    def matches(self, node: NodeView) -> bool:
        return node.name == self.node if self.node else node.partition == self.partition

    @property
    def key(self) -> tuple:
        return (self.role, self.partition, self.node)

    def at_least(self, other: "Demand") -> bool:
        """Asks for as much as other, everywhere other asks: if other cannot fit, neither can self."""
        return self.key == other.key and self.count >= other.count and self.cpus >= other.cpus and self.mem_mb >= other.mem_mb


@dataclass(frozen=True)
class Writes:
    """Where a sync job writes: a path on the storage of a partition, or of a node's partition."""

    partition: str
    node: str
    path: str  # normalised, relative to the data root ("" is all of it)

    def storage(self, nodes: dict[str, "NodeView"]) -> str:
        if self.partition:
            return self.partition
        return nodes[self.node].partition if self.node in nodes else self.node

    def overlaps(self, other: "Writes", nodes: dict[str, "NodeView"]) -> bool:
        """Whether the two write into one tree: same storage, and one path is (inside) the other."""
        if self.storage(nodes) != other.storage(nodes):
            return False
        a, b = self.path, other.path
        return not a or not b or a == b or a.startswith(b + "/") or b.startswith(a + "/")


@dataclass
class Request:
    """A pending job as the scheduler sees it."""

    job_id: int
    priority: int
    submitted: float
    time_limit: float
    demands: tuple[Demand, ...]
    writes: Writes | None = None  # a sync's destination: no two syncs into one tree run at once

    @property
    def order_key(self) -> tuple:
        return (-self.priority, self.submitted, self.job_id)


@dataclass
class Running:
    """An active job: when it is expected to end and what it holds."""

    job_id: int
    end: float
    holds: list[tuple[str, int, int]]  # (node, cpus, mem_mb)
    writes: Writes | None = None
