"""Cutting a source tree into work items and sharing them among the ranks.

Every rank of a sync job walks the same source and calls these functions
with the same arguments, so all ranks agree on who does what without
talking to each other. The split depends only on the source tree, never on
the destination: ranks look at the destination at slightly different times
(one may already have written files another has not yet listed), and a plan
that depended on what they saw there could leave work to nobody. Each rank
then compares only its own share with the destination.
"""

from __future__ import annotations

import heapq
from typing import Iterable, Iterator, NamedTuple

from .partial import chunk_count
from .tree import FILE, Entry

SMALL_MAX = 1 << 20  # files up to this size (and up to one chunk) travel batched
BATCH_BYTES = 4 << 20  # payload of one batch of small files
BATCH_FILES = 2048  # files in one batch, to bound the fields of a frame
FILE_COST = 4096  # what the per-file work is worth in bytes, for balancing

POLICIES = ("round-robin", "size-balanced")


class Item(NamedTuple):
    """One unit of work: a whole small file (``index == -1``) or one chunk of a large one."""

    entry: Entry
    index: int
    offset: int
    length: int

    @property
    def weight(self) -> int:
        """Cost used by size-balanced assignment."""
        return self.length + (FILE_COST if self.index <= 0 else 0)

    @property
    def first(self) -> bool:
        """Whether this is the file's first item (the one that counts the file)."""
        return self.index <= 0


_make = tuple.__new__


def is_small(size: int, chunk_size: int) -> bool:
    """Whether a file of ``size`` bytes travels inside a batch rather than as chunks."""
    return size <= min(chunk_size, SMALL_MAX)


def make_items(entries: Iterable[Entry], chunk_size: int) -> list[Item]:
    """Items for the regular files among ``entries``, in entry order."""
    items: list[Item] = []
    append = items.append
    small_max = min(chunk_size, SMALL_MAX)
    for e in entries:
        if e.kind != FILE:
            continue
        if e.size <= small_max:
            append(_make(Item, (e, -1, 0, e.size)))  # one per small file: without the generated __new__
            continue
        for i in range(chunk_count(e.size, chunk_size)):
            off = i * chunk_size
            items.append(Item(e, i, off, min(chunk_size, e.size - off)))
    return items


def assign(items: list[Item], nranks: int, policy: str) -> list[int]:
    """The rank of each item.

    ``round-robin``: item i goes to rank i mod nranks. ``size-balanced``:
    items from heaviest to lightest (ties by position) each go to the rank
    with the least work so far (ties to the lowest rank).
    """
    if nranks < 1:
        raise ValueError("nranks must be at least 1")
    if policy == "round-robin":
        return [i % nranks for i in range(len(items))]
    if policy == "size-balanced":
        ranks = [0] * len(items)
        loads = [(0, r) for r in range(nranks)]
        weights = [it.weight for it in items]
        replace = heapq.heapreplace
        for i in sorted(range(len(items)), key=weights.__getitem__, reverse=True):  # stable: ties by position
            load, r = loads[0]
            ranks[i] = r
            replace(loads, (load + weights[i], r))
        return ranks
    raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")


def share(items: list[Item], rank: int, nranks: int, policy: str, pinned: dict[str, int] | None = None) -> list[Item]:
    """The items ``rank`` works on, in their original order.

    A file in ``pinned`` goes whole to the rank given (its hard links or
    attributes are that rank's to make after its data, see ``meta``); the
    others are assigned by ``policy``.
    """
    if not 0 <= rank < nranks:
        raise ValueError(f"rank {rank} is not in 0..{nranks - 1}")
    if nranks == 1:
        return list(items)
    if not pinned:
        return [it for it, r in zip(items, assign(items, nranks, policy)) if r == rank]
    free = [it for it in items if it.entry.path not in pinned]
    mine = {id(it) for it, r in zip(free, assign(free, nranks, policy)) if r == rank}
    return [it for it in items if (pinned[it.entry.path] == rank if it.entry.path in pinned else id(it) in mine)]


def batches(small: list[Item], max_bytes: int = BATCH_BYTES, max_files: int = BATCH_FILES) -> Iterator[list[Item]]:
    """Group whole-file items into batches of at most ``max_bytes`` payload and ``max_files`` files."""
    batch: list[Item] = []
    size = 0
    for it in small:
        if batch and (size + it.length > max_bytes or len(batch) >= max_files):
            yield batch
            batch, size = [], 0
        batch.append(it)
        size += it.length
    if batch:
        yield batch
