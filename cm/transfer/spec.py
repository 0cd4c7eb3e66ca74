"""What one sender process is asked to do: the JSON on its stdin, one msgspec Struct each.

``Spec`` is one rank's transfer; ``SpareJob`` is what a spare sender (one
started ahead of need) is handed: the spec, whose credentials to take on,
and where its errors go. Decoding validates; what does not fit raises
``SpecError`` naming the field.
"""

from __future__ import annotations

import mmap
import re
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from . import plan
from .excludes import Excluder

Policy = Literal[plan.POLICIES]
Id = Annotated[int, Meta(ge=0, le=(1 << 32) - 1)]  # a uid or gid


class SpecError(ValueError):
    """The job description given to the sender is unusable."""


class Spec(Struct, frozen=True, forbid_unknown_fields=True):
    """What one sender process is asked to do (the JSON read from stdin)."""

    transfer_id: str
    token: str
    src_root: str
    src_path: str
    dst_host: str
    dst_port: Annotated[int, Meta(gt=0, lt=65536)]
    rank: Annotated[int, Meta(ge=0)] = 0
    nranks: Annotated[int, Meta(ge=1)] = 1
    policy: Policy = "round-robin"
    delete: bool = False
    dry_run: bool = False
    checksum: bool = False
    exclude: tuple[Annotated[str, Meta(min_length=1)], ...] = ()
    bwlimit: Annotated[float, Meta(gt=0)] | None = None  # bytes per second
    streams: Annotated[int, Meta(ge=1, le=64)] = 4
    chunk_size: Annotated[int, Meta(gt=0, multiple_of=mmap.ALLOCATIONGRANULARITY)] = 64 << 20
    owners: bool = False  # also send owners (root's and operators' syncs keep them, like rsync -a as root)
    hard_links: bool = True  # keep hard links within the tree (rsync -H)
    xattrs: bool = True  # keep extended attributes: user.*, and trusted.*/security.* with owners (rsync -X)
    acls: bool = True  # keep POSIX ACLs, access and default (rsync -A)

    def __post_init__(self) -> None:
        # what a schema cannot say (msgspec reports these at the spec's top level)
        if self.rank >= self.nranks:
            raise ValueError(f"rank {self.rank} is not in 0..{self.nranks - 1}")
        Excluder(self.exclude)  # raises ValueError for a pattern it cannot use

    @classmethod
    def from_dict(cls, data: dict) -> "Spec":
        """Validate a decoded JSON object; raises ``SpecError`` naming the bad field."""
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise SpecError(_named(exc)) from None

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Spec":
        """Decode and validate JSON text; raises ``SpecError`` naming the bad field."""
        return _decode(_spec, raw)


class SpareJob(Struct, frozen=True, forbid_unknown_fields=True):
    """A spare sender's job: the transfer (decoded after the spare became its user) and that user."""

    transfer: msgspec.Raw
    uid: Id
    gid: Id
    groups: list[Id]
    stderr: str | None = None  # the job's error log, opened as the user
    report: str | None = None  # the rank's per-file report (``report``), made by the node as the user

    @classmethod
    def from_json(cls, raw: bytes | str) -> "SpareJob":
        """Decode and validate JSON text; raises ``SpecError`` naming the bad field."""
        return _decode(_spare, raw)


_spec = msgspec.json.Decoder(Spec)
_spare = msgspec.json.Decoder(SpareJob)
_AT = re.compile(r" - at `\$\.?([^`]*)`$")


def _decode(decoder: msgspec.json.Decoder, raw):
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise SpecError(_named(exc)) from None
    except msgspec.DecodeError as exc:
        raise SpecError(f"the spec is not JSON: {exc}") from None


def _named(exc: Exception) -> str:
    """``spec field 'streams': Expected `int` <= 64`` from msgspec's ``... - at `$.streams```."""
    message = str(exc)
    m = _AT.search(message)
    if m is None or not m.group(1):
        return f"bad spec: {message[:m.start()] if m else message}"
    return f"spec field {m.group(1)!r}: {message[:m.start()]}"
