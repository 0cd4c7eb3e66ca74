"""Messages that must be acknowledged: kept, and sent again every ``retry`` seconds, until they are.

One class for both ends of the control plane: the head's commands to nodes (RunJob, KillJob; ``to`` is
the node) and a node's reports to the head (JobStarted, JobEnded, final Progress; ``to`` is ""). The
owner sends; the outbox only remembers what was sent, to whom and when. A reply's ``ref`` is the id of
the message it acknowledges.
"""

from __future__ import annotations

from typing import Callable, Iterator

from cm.protocol import Message


class Outbox:
    def __init__(self, retry: float) -> None:
        self.retry = retry
        self.items: dict[str, tuple[str, Message, float]] = {}  # msg id -> (to, message, last sent)

    def __len__(self) -> int:
        return len(self.items)

    def put(self, to: str, msg: Message, now: float) -> None:
        self.items[msg.id] = (to, msg, now)

    def ack(self, ref: str) -> Message | None:
        """The message ``ref`` names was received: forget it (and return it)."""
        item = self.items.pop(ref, None)
        return item[1] if item is not None else None

    def sent(self, msg_id: str, now: float) -> None:
        to, msg, _ = self.items[msg_id]
        self.items[msg_id] = (to, msg, now)

    def due(self, now: float) -> list[tuple[str, str, Message]]:
        """(id, to, message) of what was last sent ``retry`` seconds ago or more."""
        return [(msg_id, to, msg) for msg_id, (to, msg, sent) in self.items.items() if now - sent >= self.retry]

    def to(self, peer: str) -> list[tuple[str, Message]]:
        return [(msg_id, msg) for msg_id, (to, msg, _) in self.items.items() if to == peer]

    def messages(self) -> Iterator[Message]:
        return (msg for _, msg, _ in self.items.values())

    def drop(self, unwanted: Callable[[str, Message], bool]) -> None:
        """Forget every message ``unwanted(to, message)`` says is no longer to be delivered."""
        for msg_id, (to, msg, _) in list(self.items.items()):
            if unwanted(to, msg):
                del self.items[msg_id]
