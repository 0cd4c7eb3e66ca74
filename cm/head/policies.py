"""Placement policies: given the nodes that could take a job, in which order to use them.

A policy is chosen by name in config (``CM_POLICY``). Adding one is adding a
class here and a line in POLICIES.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from cm.head.resources import NodeView


class Placement(Protocol):
    name: str

    def order(self, candidates: Sequence[NodeView]) -> list[NodeView]:
        """Candidates in the order they should be used."""


class FirstFit:
    """Lowest-named nodes first: packs jobs, keeps whole nodes free for wide jobs."""

    name = "first-fit"

    def order(self, candidates: Sequence[NodeView]) -> list[NodeView]:
        return sorted(candidates, key=lambda n: n.sort_key)


class LeastLoaded:
    """Nodes with the largest share of free CPUs first: spreads load."""

    name = "least-loaded"

    def order(self, candidates: Sequence[NodeView]) -> list[NodeView]:
        return sorted(candidates, key=lambda n: (n.cpus_used / max(n.cpus, 1), n.mem_used / max(n.mem_mb, 1), n.sort_key))


POLICIES: dict[str, type] = {p.name: p for p in (FirstFit, LeastLoaded)}


class UnknownPolicy(ValueError):
    pass


def get_policy(name: str) -> Placement:
    try:
        return POLICIES[name]()
    except KeyError:
        raise UnknownPolicy(f"unknown placement policy {name!r}; choose one of {', '.join(POLICIES)}") from None
