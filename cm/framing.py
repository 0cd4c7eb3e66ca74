"""The 4-byte length framer of every stream socket: the commands' socket to the head (cm.cli.client,
cm.head.clients, through cm.protocol's ``frame``) and the intercom's (cm.intercom, cm.node.intercom).

A frame is its body's length (4 bytes, big-endian), then the body. Nothing is imported here: the commands
and a job's processes load this module, and must start fast.
"""

FRAME_HEADER = 4
MAX_FRAME = 16 * 1024 * 1024  # the commands' socket's limit, both ways (cm.protocol.MAX_MESSAGE)


class FrameTooBig(ValueError):
    """A frame announced more than its reader takes; nothing of it was buffered past its header."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"a frame of {size} bytes exceeds the limit of {limit}")
        self.size, self.limit = size, limit


def frame(body: bytes) -> bytes:
    """``body`` prefixed by its length."""
    return len(body).to_bytes(FRAME_HEADER, "big") + body


def unframe(buffer: bytearray, limit: int = MAX_FRAME) -> bytes | None:
    """Take one whole frame's body off the front of ``buffer``, or None if it is not all there yet.

    A frame announcing more than ``limit`` bytes raises FrameTooBig as soon as its header is in.
    """
    if len(buffer) < FRAME_HEADER:
        return None
    size = int.from_bytes(buffer[:FRAME_HEADER], "big")
    if size > limit:
        raise FrameTooBig(size, limit)
    if len(buffer) < FRAME_HEADER + size:
        return None
    body = bytes(buffer[FRAME_HEADER:FRAME_HEADER + size])
    del buffer[:FRAME_HEADER + size]
    return body
