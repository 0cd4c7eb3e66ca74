"""The mover's control channel: the node daemon → its mover process, one JSON object per line.

The daemon (``cm.node.mover``) writes a request on the mover's stdin and
reads one ``Answer`` line from its stdout; the first line the mover prints
(``ready``) answers its start. End of stdin: the mover stops. Requests are
told apart by ``op``; anything that does not fit is refused at decode with
the field named.
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec
from msgspec import Meta, Struct

Id = Annotated[int, Meta(ge=0, le=(1 << 32) - 1)]  # a uid or gid


class Register(Struct, tag_field="op", tag="register", forbid_unknown_fields=True, frozen=True):
    """Let senders that prove they hold the run's key (``token``: ``secure.run_key``; it never crosses the
    network) write under root/dst_path as uid/gid/groups."""

    transfer_id: Annotated[str, Meta(min_length=1)]
    token: Annotated[str, Meta(min_length=1)]
    root: str
    dst_path: str
    uid: Id
    gid: Id
    groups: list[Id] = []
    keep_owners: bool = False  # root's and operators' syncs keep owners


class Unregister(Struct, tag_field="op", tag="unregister", forbid_unknown_fields=True, frozen=True):
    """Forget a transfer and drop its connections."""

    transfer_id: str


class Ping(Struct, tag_field="op", tag="ping", forbid_unknown_fields=True, frozen=True):
    """Only an answer is wanted: the mover is alive."""


Request = Union[Register, Unregister, Ping]


class Answer(Struct, omit_defaults=True):
    """``ok``, or ``error`` saying why not; the start-up line also has ``ready`` and the mover's ``pid``."""

    ok: bool
    error: str | None = None
    ready: bool = False
    pid: int | None = None


_requests = msgspec.json.Decoder(Request)
_answers = msgspec.json.Decoder(Answer)
_encoder = msgspec.json.Encoder()


def decode_control(line: bytes) -> Request:
    """One request line; raises ``ValueError`` naming what does not fit."""
    try:
        return _requests.decode(line)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise ValueError(str(exc).replace("`$.", "`")) from None


def decode_answer(line: bytes) -> Answer:
    """One answer line; raises ``ValueError`` when it is not one."""
    try:
        return _answers.decode(line)
    except msgspec.DecodeError as exc:
        raise ValueError(str(exc)) from None


def encode_request(req: Request) -> bytes:
    """A request as one line (newline included)."""
    return _encoder.encode(req) + b"\n"


def encode_answer(answer: Answer) -> bytes:
    """An answer as one line (newline included)."""
    return _encoder.encode(answer) + b"\n"
