"""What happens to the head (events) and what it asks for in return (instructions).

``HeadState.handle(event)`` (cm.head.state) takes one event and returns instructions; ``HeadLoop``
(cm.head.server) makes the events from sockets and timers and carries the instructions out. Time
comes in the events (``mono``: monotonic, ``wall``: the epoch), never from a clock inside the state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cm.callers import Caller
from cm.protocol import Message, Reply, Request, RunJob, ShareKey


# --- events ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    mono: float
    wall: float


@dataclass(frozen=True)
class NodeSaid(Event):
    """A decoded message from a node (``peer``: its routing id, the node's name)."""

    peer: str
    msg: Message


@dataclass(frozen=True)
class ClientAsked(Event):
    """A client's request (the command socket or the HTTP API); ``to`` is where the answer goes."""

    caller: Caller
    request: Request
    to: Any


@dataclass(frozen=True)
class Tick(Event):
    """Timers: nodes silent too long, stops nobody confirmed, jobs past their time limit."""


@dataclass(frozen=True)
class Flush(Event):
    """Write the RUNNING transitions held back longer than ``hold`` seconds; acknowledge those starts."""

    hold: float


@dataclass(frozen=True)
class NotifyFailed(Event):
    """A job's webhook deliveries failed for good (cm.head.notify): ``cminfo JOBID`` shows ``failure``."""

    job_id: int
    failure: str


@dataclass(frozen=True)
class Pass(Event):
    """Time for a scheduler pass (the loop asks ``HeadState.pass_due``)."""


@dataclass(frozen=True)
class DbLost(Event):
    """The database stopped answering (seen by the loop: the driver lost the server)."""

    where: str
    error: str


@dataclass(frozen=True)
class DbBack(Event):
    """The database answers again: reload, and send again what unfinished jobs wait for."""


# --- instructions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send once (acks, errors, welcomes, heartbeat replies)."""

    node: str
    msg: Message


@dataclass(frozen=True)
class Command:
    """Send until acknowledged (RunJob, KillJob), through the head's Outbox; ``now``: the node is alive,
    send at once (else on its hello)."""

    node: str
    msg: Message
    now: bool = True


@dataclass(frozen=True)
class Resend:
    """Send again every command not yet acknowledged by ``node`` (it said hello)."""

    node: str


@dataclass(frozen=True)
class Delivered:
    """The node acknowledged command ``ref``: out of the Outbox."""

    ref: str


@dataclass(frozen=True)
class Forget:
    """Drop from the Outbox the RunJobs not yet acknowledged of the shares ``share`` names on ``node``, read
    as a pattern (ShareKey.matches): they must not start now."""

    node: str
    share: ShareKey

    def matches(self, to: str, msg: Message) -> bool:
        return to == self.node and isinstance(msg, RunJob) and self.share.matches(msg.share)


@dataclass(frozen=True)
class Answer:
    to: Any
    reply: Reply


@dataclass(frozen=True)
class Park:
    """A long poll: answer ``request`` (an info on ``job_id``) when the job is final or at ``deadline``."""

    job_id: int
    caller: Caller
    to: Any
    request: Request
    deadline: float


@dataclass(frozen=True)
class Intercom:
    """A job's processes' message from a node, for the head's intercom (cm.head.intercom)."""

    node: str
    msg: Message


@dataclass(frozen=True)
class Notify:
    """A job began (``event`` "begin") or ended ("end"): its webhooks are queued (cm.head.notify), never
    waited for."""

    event: str
    job: Any  # cm.head.records.Job


@dataclass(frozen=True)
class ForgetTokens:
    """An API token was revoked: the HTTP API forgets the tokens it checked lately."""


Instruction = Send | Command | Resend | Delivered | Forget | Answer | Park | Intercom | Notify | ForgetTokens
