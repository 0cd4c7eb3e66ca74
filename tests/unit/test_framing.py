"""The one framer (cm.framing) every stream socket uses."""

import pytest

from cm.framing import FRAME_HEADER, FrameTooBig, frame, unframe


def test_frames_come_off_whole_and_in_order():
    buffer = bytearray(frame(b"one") + frame(b"") + frame(b"three")[:-1])
    assert unframe(buffer) == b"one"
    assert unframe(buffer) == b""
    assert unframe(buffer) is None  # the third is not all there yet
    buffer += b"e"
    assert unframe(buffer) == b"three" and buffer == bytearray()
    assert unframe(bytearray(b"\x00\x00")) is None  # not even a header


def test_a_frame_over_the_limit_is_refused_from_its_header():
    buffer = bytearray((101).to_bytes(FRAME_HEADER, "big"))
    with pytest.raises(FrameTooBig, match="101 bytes exceeds the limit of 100") as caught:
        unframe(buffer, 100)
    assert (caught.value.size, caught.value.limit) == (101, 100)
