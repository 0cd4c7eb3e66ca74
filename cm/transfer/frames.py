"""What each of the mover's frames says: one msgspec Struct per request and per answer.

These declarations are the schema on the wire and its documentation. A
frame's fields are a msgpack map (a Struct by field name); lists of rows
are msgpack arrays (``array_like`` Structs: ``[path, mode, mtime]``).
Paths are raw bytes (msgpack bin), relative to the transfer's destination.
``decode_request`` and ``decode_answer`` refuse anything that does not
fit with ``FrameError`` naming the field (``files[3].mode``). What a
schema cannot say (a path's parts, the largest chunk this receiver takes)
is checked where it is used (``paths.wire_parts``, the receiver).

Requests go sender → receiver, each answered by OK with the Struct that
``ANSWERS`` names for its kind, or by ERROR (``Error``).
"""

import enum
import mmap
import re
import types
from typing import Annotated, Literal, Union, get_args, get_origin

import msgspec
from msgspec import Meta, Struct

Count = Annotated[int, Meta(ge=0)]
Id = Annotated[int, Meta(ge=0, le=(1 << 32) - 2)]  # a uid or gid ((uid_t)-1 means "no change")
Mode = Annotated[int, Meta(ge=0, le=0o7777)]  # permission bits, set-id and sticky bits
Mtime = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]  # nanoseconds since the epoch
ChunkSize = Annotated[int, Meta(gt=0, multiple_of=mmap.ALLOCATIONGRANULARITY)]  # chunks are mapped at offsets
Digest = Annotated[int, Meta(ge=0)]  # XXH3-64 (msgpack holds no more than 64 bits)
MAX_ROWS = 1_000_000  # rows in one request (the frame's size is bounded as well)


class Kind(enum.IntEnum):
    """Frame kinds (the header's kind byte). Requests go sender → receiver; OK/ERROR answer each one."""

    HELLO = 1
    OK = 2
    ERROR = 3
    MANIFEST = 4
    PARTIALS = 5
    CHECKSUMS = 6
    MKDIRS = 7
    DELETE = 8
    SYMLINKS = 9
    META = 10
    BATCH = 11
    CHUNK = 12
    DIRMETA = 13
    BYE = 14
    OWNERS = 15
    AUTH = 16
    SPECIALS = 17
    HARDLINKS = 18
    XATTRS = 19


class FrameError(ValueError):
    """A frame's fields do not fit the schema of its kind; the message names the field."""


class Frame(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Fields of one frame: a msgpack map."""


class Row(Struct, array_like=True, forbid_unknown_fields=True):
    """One row of a list in a frame: a msgpack array."""


def _rows(row: type) -> type:
    return Annotated[list[row], Meta(max_length=MAX_ROWS)]


# ---- rows ----

class PartialRow(Row):
    path: bytes
    size: Count
    mtime: Mtime
    chunk_size: ChunkSize


class ChecksumRow(Row):
    path: bytes
    size: Count
    chunk_size: ChunkSize


class DirRow(Row):
    path: bytes
    mode: Mode


class LinkRow(Row):
    path: bytes
    target: bytes
    mtime: Mtime


class MetaRow(Row):
    path: bytes
    mode: Mode
    mtime: Mtime


class BatchRow(Row):
    """One small file of a batch; ``uid`` and ``gid`` only for transfers that keep owners
    (the file is created with them, so it needs no later owners pass)."""

    path: bytes
    size: Count
    mode: Mode
    mtime: Mtime
    digest: Digest
    uid: Id | None = None
    gid: Id | None = None


class ExtentRow(Row):
    """Where data is in a chunk of a sparse file (the rest is hole): offset within the chunk, length."""

    offset: Count
    length: Count


class OwnerRow(Row):
    path: bytes
    uid: Id
    gid: Id
    mode: Mode


class SpecialRow(Row):
    """A fifo (p), socket (s) or device (c, b: root's and operators' transfers only) to make."""

    path: bytes
    kind: Literal["p", "s", "c", "b"]
    mode: Mode
    mtime: Mtime
    rdev: Count = 0


class HardLinkRow(Row):
    """``path`` is to be another name of ``leader`` (a file of the same tree)."""

    path: bytes
    leader: bytes


class XAttr(Row):
    name: bytes
    value: bytes


class XAttrRow(Row):
    """Every extended attribute of one entry in the transfer's namespaces (an empty list: none)."""

    path: bytes
    mode: Mode
    attrs: Annotated[list[XAttr], Meta(max_length=4096)]


class EntryRow(Row):
    """One entry of a manifest (see ``tree.Entry``); kind is f(ile), d(irectory), l(ink), p (fifo),
    s(ocket), c(haracter device) or b(lock device); a device's size is its device number."""

    path: bytes
    kind: Literal["f", "d", "l", "p", "s", "c", "b"]
    size: Count
    mtime: Mtime
    mode: Mode
    target: bytes
    uid: Annotated[int, Meta(ge=-1)]  # -1: not known
    gid: Annotated[int, Meta(ge=-1)]


class VerifiedRow(Row):
    index: Count
    digest: Digest


class PathError(Row):
    """A path the receiver could not change, and why; the request went on with the others."""

    path: bytes
    message: str


# ---- requests ----

Nonce = Annotated[bytes, Meta(min_length=32, max_length=32)]
Proof = Annotated[bytes, Meta(min_length=32, max_length=32)]


class Hello(Frame):
    """First frame of a connection, in clear: which transfer, and the sender's nonce. → ``Challenge``.

    No secret: the handshake (``secure``) proves each side holds the run's key.
    """

    transfer_id: Annotated[str, Meta(min_length=1, max_length=256)]
    nonce: Nonce


class Auth(Frame):
    """The sender's proof that it holds the run's key, in clear; the answer is the first sealed record.
    → ``Welcome``."""

    proof: Proof


class Manifest(Frame):
    """Page ``page`` of the destination's entries. → ``ManifestPage``.

    All of them: the sender leaves out what its excludes match (user patterns never run in the mover).
    """

    page: Count = 0


class Partials(Frame):
    """Chunks of large files already verified by an earlier run. → ``Verified``."""

    files: _rows(PartialRow)


class Checksums(Frame):
    """Chunk digests of files as the destination has them (``--checksum``). → ``Digests``."""

    files: _rows(ChecksumRow)


class Mkdirs(Frame):
    """Directories to create, parents first. → ``Done``."""

    dirs: _rows(DirRow)


class Delete(Frame):
    """Paths to remove (directories with what is in them). → ``Removed``."""

    paths: Annotated[list[bytes], Meta(max_length=MAX_ROWS)]


class Symlinks(Frame):
    """Symlinks to create or replace. → ``Done``."""

    links: _rows(LinkRow)


class FileMeta(Frame):
    """Mode and mtime of files already in place (kind META). → ``Done``."""

    files: _rows(MetaRow)


class Batch(Frame):
    """Small files whose data follow as the payload, one after another. → ``BatchDone``."""

    files: _rows(BatchRow)


class Chunk(Frame):
    """Chunk ``index`` of a file; its data follow as a streamed payload and trailer. → ``ChunkDone``.

    ``uid`` and ``gid`` only for transfers that keep owners. ``extents``
    only for a file with holes (``sparse``): the payload is the data of
    these extents alone, and the holes stay holes; ``holes_after``: so many
    chunks after this one are all hole, and are received with it.
    """

    path: bytes
    size: Count
    mode: Mode
    mtime: Mtime
    chunk_size: ChunkSize
    index: Count
    uid: Id | None = None
    gid: Id | None = None
    extents: _rows(ExtentRow) | None = None
    holes_after: Count = 0


class DirMeta(Frame):
    """Mode and mtime of directories, after what is in them. → ``Done``."""

    dirs: _rows(MetaRow)


class Owners(Frame):
    """Owners to set; only for transfers that keep owners. → ``Done``."""

    entries: _rows(OwnerRow)


class Specials(Frame):
    """Fifos, sockets and devices to create or replace. → ``Applied``."""

    entries: _rows(SpecialRow)


class HardLinks(Frame):
    """Names to make other names of a file already in place (replacing what is there). → ``Applied``."""

    links: _rows(HardLinkRow)


class XAttrs(Frame):
    """Extended attributes to give entries (POSIX ACLs are ``system.posix_acl_*``). → ``Applied``.

    Within ``namespaces`` (name prefixes) each entry ends with exactly the
    attributes listed; ``trusted.`` and ``security.`` only in transfers that keep owners.
    """

    namespaces: list[bytes]
    entries: _rows(XAttrRow)


class Bye(Frame):
    """The sender is done with this connection. No answer."""


# ---- answers ----

class Challenge(Frame):
    """OK to HELLO, in clear: the mover's nonce, whether records are encrypted, and its proof that it is
    the destination (it holds the run's key)."""

    nonce: Nonce
    proof: Proof
    encrypt: bool = True


class Welcome(Frame):
    """OK to AUTH (sealed): the largest chunk and batch payload this receiver takes."""

    max_chunk: Count
    max_batch: Count = 0


class ManifestPage(Frame):
    entries: list[EntryRow]
    more: bool = False


class Verified(Frame):
    """Per file of PARTIALS, the chunks verified so far."""

    verified: list[list[VerifiedRow]]


class Digests(Frame):
    """Per file of CHECKSUMS, its chunk digests, or None when it is absent or of another size."""

    digests: list[list[Digest] | None]


class Done(Frame):
    errors: list[PathError] = []


class Removed(Frame):
    removed: Count = 0
    errors: list[PathError] = []


class BatchDone(Frame):
    """``bad``: indices of files whose checksum did not match (nothing written for them)."""

    bad: list[Count] = []
    errors: list[PathError] = []


class ChunkDone(Frame):
    """``ok``: the chunk matched its digest; ``published``: the file is complete under its name.

    ``error``: the receiver may not write this file (its payload was passed by).
    """

    ok: bool
    published: bool = False
    error: str | None = None


class Applied(Frame):
    """``changed``: indices of the rows that changed something; ``skipped``: what the destination
    cannot hold (no xattr support, an ACL it refuses, a device it may not make), and why."""

    changed: list[Count] = []
    errors: list[PathError] = []
    skipped: list[PathError] = []


class Error(Frame):
    """ERROR: why a request was refused; the receiver closes the connection after it."""

    message: str = "unspecified error"


REQUESTS: dict[Kind, type[Frame]] = {
    Kind.HELLO: Hello, Kind.MANIFEST: Manifest, Kind.PARTIALS: Partials, Kind.CHECKSUMS: Checksums,
    Kind.MKDIRS: Mkdirs, Kind.DELETE: Delete, Kind.SYMLINKS: Symlinks, Kind.META: FileMeta,
    Kind.BATCH: Batch, Kind.CHUNK: Chunk, Kind.DIRMETA: DirMeta, Kind.OWNERS: Owners, Kind.BYE: Bye,
    Kind.AUTH: Auth,
    Kind.SPECIALS: Specials, Kind.HARDLINKS: HardLinks, Kind.XATTRS: XAttrs,
}
KINDS: dict[type[Frame], Kind] = {schema: kind for kind, schema in REQUESTS.items()}
ANSWERS: dict[Kind, type[Frame]] = {
    Kind.HELLO: Challenge, Kind.AUTH: Welcome, Kind.MANIFEST: ManifestPage, Kind.PARTIALS: Verified,
    Kind.CHECKSUMS: Digests,
    Kind.MKDIRS: Done, Kind.DELETE: Removed, Kind.SYMLINKS: Done, Kind.META: Done, Kind.BATCH: BatchDone,
    Kind.CHUNK: ChunkDone, Kind.DIRMETA: Done, Kind.OWNERS: Done,
    Kind.SPECIALS: Applied, Kind.HARDLINKS: Applied, Kind.XATTRS: Applied,
}

_request_decoders = {kind: msgspec.msgpack.Decoder(schema) for kind, schema in REQUESTS.items()}
_answer_decoders = {kind: msgspec.msgpack.Decoder(schema) for kind, schema in ANSWERS.items()}
_error_decoder = msgspec.msgpack.Decoder(Error)
encode = msgspec.msgpack.Encoder().encode


def decode_request(kind: Kind, raw) -> Frame:
    """The fields of a request of ``kind``; raises ``FrameError`` naming what does not fit."""
    try:
        return _request_decoders[kind].decode(raw)
    except msgspec.ValidationError as exc:
        raise FrameError(f"{kind.name} {_named(REQUESTS[kind], str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise FrameError(f"undecodable {kind.name} fields: {exc}") from None


def decode_answer(to: Kind, ok: bool, raw) -> Frame:
    """The fields of the OK (``ok``) or ERROR answer to a request of kind ``to``."""
    if ok and to not in ANSWERS:
        raise FrameError(f"{to.name} is not answered")
    schema, decoder = (ANSWERS[to], _answer_decoders[to]) if ok else (Error, _error_decoder)
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise FrameError(f"answer to {to.name} {_named(schema, str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise FrameError(f"undecodable answer to {to.name}: {exc}") from None


_AT = re.compile(r" - at `\$([^`]*)`$")
_STEP = re.compile(r"\.(\w+)|\[(\d+)\]")


def _named(schema: type, message: str) -> str:
    """msgspec's message with its path spelled with field names: ``$.files[0][2]`` → ``files[0].mode``."""
    m = _AT.search(message)
    if m is None:
        return message
    out, typ = [], schema
    for name, index in _STEP.findall(m.group(1)):
        typ = _bare(typ)
        if name:
            out.append(f".{name}")
            typ = _field_type(typ, name)
        elif isinstance(typ, type) and issubclass(typ, Row):
            field = msgspec.structs.fields(typ)[int(index)]
            out.append(f".{field.name}")
            typ = field.type
        else:
            out.append(f"[{index}]")
            args = get_args(typ)
            typ = args[0] if args else None
    return f"{message[:m.start()]} - at `{''.join(out).lstrip('.')}`"


def _bare(typ):
    """Strip Annotated and Optional around a type."""
    while True:
        origin = get_origin(typ)
        if origin is Annotated:
            typ = get_args(typ)[0]
        elif origin is Union or origin is types.UnionType:
            typ = next((a for a in get_args(typ) if a is not type(None)), None)
        else:
            return typ


def _field_type(typ, name: str):
    if isinstance(typ, type) and issubclass(typ, Struct):
        for field in msgspec.structs.fields(typ):
            if field.name == name:
                return field.type
    return None
