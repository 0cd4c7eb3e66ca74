"""Unit tests of the head's job logic: the JobTable state machine against an in-memory store.

No database server, no sockets, no daemons, no sleeps: time-outs are driven
by passing ``now``. The store validates new jobs through the same mongoengine
document as MongoDB does, and its writes are conditional in the same way
(memory_store.py).
"""

from __future__ import annotations

import pytest

from cm.head.jobs import JobTable

from .memory_store import MemoryStore


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def up() -> set[str]:
    """The nodes the table believes alive (a test removes one to take it DOWN)."""
    return {"n1", "n2", "n3", "n4"}


@pytest.fixture
def table(store, up) -> JobTable:
    t = JobTable(store, stop_timeout=8.0)
    t.node_alive = lambda name: name in up
    return t
