"""The diff decision of one rank: which of its files and chunks the destination lacks.

Given the source's entries and the destination's manifest, ``decide``
works out this rank's share (``plan``), drops what already matches (size
and mtime, or chunk digests with ``--checksum``), and asks the destination
which chunks of large files an earlier run verified already (``resume``).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from . import diff, plan
from . import frames as f
from .connection import request_pages
from .partial import chunk_count
from .source import Source
from .spec import Spec
from .stats import Stats
from .tree import FILE, Entry
from .wire import Channel


@dataclass
class Work:
    """What this rank sends, and what it counts."""

    small: list[plan.Item] = field(default_factory=list)  # files that travel batched
    chunks: list[plan.Item] = field(default_factory=list)  # chunks of large files
    meta: list[Entry] = field(default_factory=list)  # in place already; only mode or mtime differ
    would: list[str] = field(default_factory=list)  # what a dry run reports
    owned: list[Entry] = field(default_factory=list)  # files whose owner this rank sets (syncs that keep owners)
    remaining: Counter = field(default_factory=Counter)  # chunks left to send, per file
    first_paths: set[str] = field(default_factory=set)  # chunked files this rank counts as sent
    verified: Counter = field(default_factory=Counter)  # bytes of this rank's chunks verified at the destination

    def given_up(self, moved: set[str]) -> list[Entry]:
        """The chunked files of this rank that vanished or changed (``moved``) before all of it arrived."""
        seen = {it.entry.path: it.entry for it in self.chunks if it.entry.path in moved}
        return [e for path, e in seen.items() if self.remaining[path] > 0]

    def partial_bytes(self) -> int:
        """Bytes verified at the destination of files not published yet (kept there for resuming)."""
        return sum(self.verified[path] for path, left in self.remaining.items() if left > 0)


def decide(spec: Spec, chan: Channel, entries: list[Entry], dst: dict[str, Entry], source: Source,
           stats: Stats, pinned: dict[str, int] | None = None) -> Work:
    """Which of this rank's items the destination lacks; sets the totals in ``stats``.

    ``pinned``: files that go whole to one rank (``plan.share``)."""
    work = Work()
    files = [e for e in entries if e.kind == FILE]
    if spec.nranks == 1 and not spec.checksum:
        # a lone rank owns every file: those already in place need no work item at all
        changed = []
        for e in files:
            d = dst.get(e.path)
            if d is not None and d.kind == FILE and d.size == e.size and d.mtime_ns == e.mtime_ns:
                stats.files_skipped += 1
                work.owned.append(e)
                if d.mode != e.mode:
                    work.meta.append(e)
            else:
                changed.append(e)
        files = changed
    items = plan.share(plan.make_items(files, spec.chunk_size), spec.rank, spec.nranks, spec.policy, pinned)
    by_file: dict[str, list[plan.Item]] = {}
    for it in items:
        by_file.setdefault(it.entry.path, []).append(it)
    same_content: set[str] = set()
    if spec.checksum:
        candidates = [its[0].entry for its in by_file.values()
                      if diff.file_matches(its[0].entry, dst.get(its[0].entry.path), compare_mtime=False)]
        theirs = request_pages(chan, f.Checksums,
                               [f.ChecksumRow(os.fsencode(e.path), e.size, spec.chunk_size) for e in candidates],
                               stats, "digests")
        for e, digests in zip(candidates, theirs):
            if digests is not None and digests == source.digests(e, spec.chunk_size):
                same_content.add(e.path)
    big: list[Entry] = []
    for path, its in by_file.items():
        e, d = its[0].entry, dst.get(path)
        owns_file = its[0].first
        same = path in same_content if spec.checksum else diff.file_matches(e, d)
        if owns_file and (same or its[0].index < 0):
            work.owned.append(e)  # a file sent in chunks carries its owner in its CHUNK frames
        if same:
            if owns_file:
                stats.files_skipped += 1
                if d.mode != e.mode or d.mtime_ns != e.mtime_ns:
                    work.meta.append(e)
            continue
        if owns_file:
            work.would.append(f"send {path}")
        if its[0].index < 0:
            work.small.append(its[0])
        else:
            work.chunks.extend(its)
            big.append(e)
    if big and not spec.dry_run:
        planned = work.chunks
        work.chunks = resume(spec, chan, big, work.chunks, source, stats)
        left = set(work.chunks)
        for it in planned:
            if it not in left:
                work.verified[it.entry.path] += it.length
    work.remaining = Counter(it.entry.path for it in work.chunks)
    work.first_paths = {path for path in work.remaining if by_file[path][0].first}
    stats.files_total = len(work.would) if spec.dry_run else len(work.small) + len(work.first_paths)
    stats.bytes_total = sum(it.length for it in work.small) + sum(it.length for it in work.chunks)
    return work


def resume(spec: Spec, chan: Channel, big: list[Entry], chunks: list[plan.Item], source: Source,
           stats: Stats) -> list[plan.Item]:
    """Drop chunks the destination already verified (same digest) in an earlier run."""
    cs = spec.chunk_size
    verified = request_pages(chan, f.Partials,
                             [f.PartialRow(os.fsencode(e.path), e.size, e.mtime_ns, cs) for e in big],
                             stats, "verified")
    done = {e.path: {row.index: row.digest for row in v} for e, v in zip(big, verified) if v}
    if not done:
        return chunks
    keep = []
    handles = source.handles()
    try:
        for it in chunks:
            have = done.get(it.entry.path, {})
            complete = len(have) == chunk_count(it.entry.size, cs)
            if it.index in have and not (complete and it.index == 0):
                if source.chunk_digest(handles, it) == have[it.index]:
                    stats.chunks_resumed += 1
                    continue
            keep.append(it)
    finally:
        handles.close()
    return keep
