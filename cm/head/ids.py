"""Job ids: taken from the store in blocks, so a submission rarely costs a write for its id."""

from __future__ import annotations

from typing import Callable, Iterator


class JobIds:
    """Fresh job ids from ``reserve(count)`` (the store's), ``block`` at a time. Ids of a block the head
    did not use before it stopped are skipped, never reused."""

    def __init__(self, reserve: Callable[[int], range], block: int = 64) -> None:
        self.reserve, self.block = reserve, block
        self._ids: Iterator[int] = iter(())

    def next(self) -> int:
        for job_id in self._ids:
            return job_id
        self._ids = iter(self.reserve(self.block))
        return next(self._ids)
