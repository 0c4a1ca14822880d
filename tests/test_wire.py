"""Prebuilt text frames (gateway/wire.py) against websockets' own framing (RFC 6455 §5.2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from gateway.wire import text_frame

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]


def payload_of(size: int) -> bytes:
    """JSON-ish ASCII of exactly `size` bytes, different at every position."""
    pattern = b'{"type":"odds","seq":0123456789}'
    return (pattern * (size // len(pattern) + 1))[:size]


def websockets_frame(payload: bytes) -> bytes:
    return Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])


def parse_one(data: bytes) -> tuple[Frame, bytes]:
    """Parse one frame the way a websockets client does; return it and what is left."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False, max_size=None, extensions=[])
    try:
        next(parser)
    except StopIteration as done:
        return done.value, rest_of(reader)
    raise AssertionError("the parser wanted more bytes than the frame holds")


def rest_of(reader: StreamReader) -> bytes:
    remaining = reader.read_to_eof(2**32)
    try:
        next(remaining)
    except StopIteration as done:
        return done.value
    raise AssertionError("the reader did not reach EOF")


@pytest.mark.parametrize("size", SIZES)
def test_text_frame_is_byte_for_byte_what_websockets_builds(size: int) -> None:
    payload = payload_of(size)
    assert text_frame(payload) == websockets_frame(payload)


@pytest.mark.parametrize("size", SIZES)
def test_text_frame_parses_back_as_one_final_unmasked_text_frame(size: int) -> None:
    payload = payload_of(size)
    frame, rest = parse_one(text_frame(payload))
    assert frame.opcode is Opcode.TEXT
    assert frame.fin is True
    assert (frame.rsv1, frame.rsv2, frame.rsv3) == (False, False, False)
    assert bytes(frame.data) == payload
    assert rest == b""


@pytest.mark.parametrize(
    "size, header",
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_text_frame_header_uses_the_shortest_length_encoding(size: int, header: bytes) -> None:
    data = text_frame(payload_of(size))
    assert data[: len(header)] == header
    assert len(data) == len(header) + size


def test_frames_written_back_to_back_parse_apart() -> None:
    first, second = payload_of(130), payload_of(3)
    frame, rest = parse_one(text_frame(first) + text_frame(second))
    assert bytes(frame.data) == first
    assert rest == text_frame(second)


def test_text_frame_carries_utf8_payload_unchanged() -> None:
    payload = '{"name":"Atlético","price":"1.85"}'.encode()
    frame, _ = parse_one(text_frame(payload))
    assert frame.data.decode("utf-8") == payload.decode("utf-8")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300) | st.integers(65530, 65540).map(payload_of))
def test_text_frame_matches_websockets_for_any_payload(payload: bytes) -> None:
    assert text_frame(payload) == websockets_frame(payload)
