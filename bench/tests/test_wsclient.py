"""bench/wsclient.py against websockets' sans-I/O server: no socket, no event loop.

The client's bytes go to a `ServerProtocol` and the server's bytes back, cut
wherever a read could cut them, so the handshake, masking, pings, fragments,
the close and the plain-frame shortcut are all checked against RFC 6455 as
websockets implements it.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

from bench.adapters import OddsgateConn
from bench.counters import Counters
from bench.wsclient import WsClient


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def take(self) -> bytes:
        out, self.written = b"".join(self.written), []
        return out

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class _Recorder(WsClient):
    def __init__(self, headers: dict[str, str] | None = None) -> None:
        super().__init__("127.0.0.1", 8001, "/ws?x=1", headers)
        self.messages: list[bytes] = []
        self.opened = 0

    def on_open(self) -> None:
        self.opened += 1

    def on_message(self, payload: bytes) -> None:
        self.messages.append(bytes(payload))


def _pair(headers: dict[str, str] | None = None) -> tuple[_Recorder, _Transport, ServerProtocol,
                                                           Request]:
    """A client whose handshake the server accepted; the response not delivered yet."""
    client, transport, server = _Recorder(headers), _Transport(), ServerProtocol()
    client.connection_made(transport)  # type: ignore[arg-type]
    server.receive_data(transport.take())
    [request] = server.events_received()
    server.send_response(server.accept(request))
    return client, transport, server, request


def _serve(server: ServerProtocol) -> bytes:
    return b"".join(server.data_to_send())


def test_the_handshake_carries_the_path_and_headers_and_opens():
    client, _, server, request = _pair({"Cookie": "og_session=abc"})
    assert request.path == "/ws?x=1"
    assert request.headers["Cookie"] == "og_session=abc"
    assert "Sec-WebSocket-Extensions" not in request.headers  # no compression offered
    assert not client.open
    client.data_received(_serve(server))
    assert client.open and client.upgraded and client.opened == 1


def test_a_refused_handshake_is_a_handshake_error():
    client, transport, server = _Recorder(), _Transport(), ServerProtocol()
    client.connection_made(transport)  # type: ignore[arg-type]
    server.receive_data(transport.take())
    server.events_received()
    server.send_response(server.reject(503, "draining\n"))
    client.data_received(_serve(server))
    assert not client.open and not client.upgraded
    assert client.handshake_error is not None and "503" in client.handshake_error
    assert transport.closing


@pytest.mark.parametrize("size", [0, 5, 125, 126, 300, 70_000])
def test_client_frames_are_masked_and_decode(size):
    client, transport, server, _ = _pair()
    client.data_received(_serve(server))
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    client.send_text(payload)
    client.send_binary(payload)
    server.receive_data(transport.take())  # a server fails any unmasked frame
    frames = server.events_received()
    assert [(f.opcode, f.data) for f in frames] == [(Opcode.TEXT, payload),
                                                   (Opcode.BINARY, payload)]


def _stream(rng: random.Random, server: ServerProtocol) -> tuple[bytes, list[bytes]]:
    """Server bytes mixing plain frames with everything the protocol must handle."""
    expected = []
    for _ in range(60):
        kind = rng.choice(["text", "text", "binary", "big", "fragmented", "ping", "medium"])
        size = {"big": 70_000, "medium": rng.randrange(126, 3000)}.get(kind, rng.randrange(0, 126))
        body = rng.randbytes(size)
        if kind == "ping":
            server.send_ping(body[:100])
            continue
        if kind == "fragmented":
            server.send_text(body[:10], fin=False)
            server.send_continuation(body[10:20], fin=False)
            server.send_continuation(body[20:], fin=True)
        elif kind == "binary":
            server.send_binary(body)
        else:
            server.send_text(body)
        expected.append(body)
    return _serve(server), expected


@pytest.mark.parametrize("seed", range(8))
def test_frames_cut_anywhere_come_out_whole_and_in_order(seed):
    rng = random.Random(seed)
    client, transport, server, _ = _pair()
    head = _serve(server)
    stream, expected = _stream(rng, server)
    data = head + stream
    pos = 0
    while pos < len(data):
        cut = pos + rng.choice([1, 2, 3, 7, 100, 1500, 65536])
        client.data_received(data[pos:cut])
        pos = cut
    assert client.messages == expected
    server.receive_data(transport.take())  # the client's replies to the pings
    replies = [f for f in server.events_received() if isinstance(f, Frame)]
    assert replies and all(f.opcode is Opcode.PONG for f in replies)


def test_a_close_is_echoed_and_ends_the_connection():
    client, transport, server, _ = _pair()
    server.send_text(b"last")
    server.send_close(1012, "reload")
    client.data_received(_serve(server))
    assert client.messages == [b"last"]
    assert client.close_code == 1012 and not client.open and transport.closing
    server.receive_data(transport.take())
    [echo] = server.events_received()
    assert echo.opcode is Opcode.CLOSE


def test_a_protocol_error_closes():
    client, transport, server, _ = _pair()
    client.data_received(_serve(server))
    client.data_received(b"\x81\x85abcd12345")  # a masked server frame: RFC 6455 §5.1
    assert not client.open and transport.closing
    assert client.messages == []


def test_nothing_is_sent_once_closed():
    client, transport, server, _ = _pair()
    client.data_received(_serve(server))
    client.close(1000)
    transport.take()
    client.send_text(b"late")
    assert transport.take() == b""


def test_an_adapter_gets_every_frame_through_either_path():
    """Plain frames and the protocol's (a ping between, a fragmented batch) reach
    the adapter's own hooks, whatever names the adapter uses for its own state."""

    async def run() -> Counters:
        counters = Counters()
        conn = OddsgateConn("127.0.0.1", 8001, counters, ["odds:1:39"])
        transport, server = _Transport(), ServerProtocol()
        conn.connection_made(transport)  # type: ignore[arg-type]
        server.receive_data(transport.take())
        [request] = server.events_received()
        server.send_response(server.accept(request))
        server.send_text(b'{"type":"welcome","worker":0}')
        conn.data_received(_serve(server))
        conn.subscribe()
        server.receive_data(transport.take())
        assert server.events_received()[0].data.startswith(b'{"op":"subscribe"')
        server.send_text(b'{"type":"subscribed","id":1,"topics":["odds:1:39"]}')
        server.send_text(b'{"type":"snapshot","topic":"odds:1:39","epoch":"e","seq":0,'
                         b'"markets":[]}')
        server.send_ping(b"hb")
        event = b'{"type":"odds","topic":"odds:1:39","epoch":"e","seq":%d,"ts":1}'
        server.send_text(event % 1)
        batch = b'{"type":"batch","events":[' + event % 2 + b"," + event % 3 + b"]}"
        server.send_text(batch[:20], fin=False)
        server.send_continuation(batch[20:], fin=True)
        conn.data_received(_serve(server))
        assert conn.synced.done()
        return counters

    counters = asyncio.run(run())
    assert counters.deliveries == 3 and counters.violations == {}
