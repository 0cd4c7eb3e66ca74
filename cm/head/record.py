"""The head's events as lines of JSON, to replay a bug against HeadState (tests/unit/test_head_state.py).

With ``CM_HEAD_EVENTS`` set, the head appends one line per event: its kind, its times, its fields (a node's
message or a client's request as the bytes that came on the wire, hex: what the decoder reads is what a
replay reads), and what the state answered in short (``summary``). A bug report becomes this file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from cm.config import Settings
from cm.callers import Caller
from cm.head.events import (Answer, ClientAsked, Command, DbBack, DbLost, Event, Flush, Instruction, NodeSaid, Pass,
                            Send, Tick)
from cm.protocol import decode, encode



@dataclass(frozen=True)
class Open(Event):
    """Not an event: the line that says the head (re)started here and loaded from its stores."""


KINDS: dict[str, type[Event]] = {k.__name__: k for k in (Open, NodeSaid, ClientAsked, Tick, Flush, Pass, DbLost,
                                                         DbBack)}


def summary(instructions: list[Instruction]) -> list[list[Any]]:
    """What the instructions ask, without message ids (new on every run): kind, node, message and its job."""
    out: list[list[Any]] = []
    for ins in instructions:
        if isinstance(ins, (Send, Command)):
            msg = ins.msg
            out.append([type(ins).__name__, ins.node, msg.TYPE, getattr(msg, "job_id", None),
                        getattr(msg, "state", None)])
        elif isinstance(ins, Answer):
            out.append(["Answer", ins.reply.ok])
        else:
            out.append([type(ins).__name__])
    return out


def line_of(ev: Event, instructions: list[Instruction], settings: Settings | None = None) -> str:
    """One event's line; the Open line holds the head's settings too."""
    fields: dict[str, Any] = {"kind": type(ev).__name__, "mono": ev.mono, "wall": ev.wall}
    if settings is not None:
        fields["settings"] = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
    if isinstance(ev, NodeSaid):
        fields.update(peer=ev.peer, msg=encode(ev.msg).hex())
    elif isinstance(ev, ClientAsked):
        c = ev.caller
        fields.update(caller=[c.uid, c.gid, c.pid, c.user, c.operator], request=encode(ev.request).hex())
    elif isinstance(ev, Flush):
        fields["hold"] = ev.hold
    elif isinstance(ev, DbLost):
        fields.update(where=ev.where, error=ev.error)
    fields["out"] = summary(instructions)
    return json.dumps(fields, separators=(",", ":"))


def event_of(line: str, to: Any = None) -> tuple[Event, list[list[Any]]]:
    """The event a line records (a client's answer goes to ``to``), and the summary of what it was answered."""
    f = json.loads(line)
    kind, times = KINDS[f["kind"]], (f["mono"], f["wall"])
    if kind is NodeSaid:
        ev: Event = NodeSaid(*times, f["peer"], decode(bytes.fromhex(f["msg"])))
    elif kind is ClientAsked:
        ev = ClientAsked(*times, Caller(*f["caller"]), decode(bytes.fromhex(f["request"])), to)  # type: ignore[arg-type]
    elif kind is Flush:
        ev = Flush(*times, f["hold"])
    elif kind is DbLost:
        ev = DbLost(*times, f["where"], f["error"])
    else:
        ev = kind(*times)
    return ev, f["out"]


class Recorder:
    """Appends the head's events to a file (CM_HEAD_EVENTS), each written at once: a head killed keeps them."""

    def __init__(self, path: str, settings: Settings) -> None:
        self.file, self.settings = open(path, "a", encoding="utf-8"), settings

    def opened(self, now: float, wall: float, instructions: list[Instruction]) -> None:
        self.file.write(line_of(Open(now, wall), instructions, self.settings) + "\n")

    def handled(self, ev: Event, instructions: list[Instruction]) -> None:
        self.file.write(line_of(ev, instructions) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
