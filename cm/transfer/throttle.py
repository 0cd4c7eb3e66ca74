"""Rate limiting of a sender's streams (``--bwlimit``)."""

from __future__ import annotations

import threading
import time


class Throttle:
    """Caps the bytes per second of all streams together (token bucket without burst)."""

    def __init__(self, rate: float):
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def __call__(self, n: int) -> None:
        """Wait until ``n`` more bytes may leave."""
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + n / self.rate
        if start > now:
            time.sleep(start - now)
