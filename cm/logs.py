"""JSON logs for the daemons: one object per line."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(level: str = "INFO", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pymongo").setLevel(max(logging.INFO, root.level))  # its DEBUG is one line per command


def event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields) -> None:
    """Log msg with structured fields."""
    logger.log(level, msg, extra={"fields": fields})


REPEAT_EVERY = 60.0  # seconds between two log lines about one refused peer (which retries every 1 to 10 s)


class Sometimes:
    """Says when a repeated log line about one thing (a key, a node) is due: at most once every ``every``
    seconds per thing, remembering at most ``most`` things (a peer sending random ones must not grow it)."""

    def __init__(self, every: float = REPEAT_EVERY, most: int = 1024) -> None:
        self.every, self.most = every, most
        self.last: dict[object, float] = {}

    def due(self, what: object) -> bool:
        now = time.monotonic()
        if now - self.last.get(what, -self.every) < self.every:
            return False
        if len(self.last) >= self.most:
            self.last.clear()
        self.last[what] = now
        return True
