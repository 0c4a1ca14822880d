"""The load generator's WebSocket client: websockets' sans-I/O `ClientProtocol`
inside a plain asyncio protocol.

The load generator holds tens of thousands of these, so a connection is one
protocol object: no task, no queue, no coroutine per frame. RFC 6455 is
websockets' `ClientProtocol`, the state machine the client library and the
workers run: it writes and checks the opening handshake
(`Sec-WebSocket-Accept` included), masks what we send, answers pings,
assembles fragments, checks every frame it is given and runs the closing
handshake. This class moves bytes between it and the transport, with one
exception, for cost: it cuts the stream at frame boundaries itself, and a
plain frame (the server's everyday one: FIN, text or binary, no RSV bit,
unmasked, outside a fragmented message) goes straight to `on_message`, a
subclass hook. Every other frame goes to the protocol, whole.

Why: websockets parses each frame in generator coroutines (a `read_exact`
per header field, a `Frame` and its checks): ~2.2 us a frame more than these
lines on this machine, +55% on what the load generator spends per event at
one event a frame, and the load generator is the bench's ceiling
(bench/README.md, "The load generator", has the figures;
`python -m bench.wsclient_cost` measures them). Handing the protocol whole
frames only also keeps its buffer empty, so a read cut mid-frame (a
backlog, a big snapshot) never sends the frames after it down the slow path.

No extension is offered, so no compression; no size limit, as the bench
reads only what its own servers send (a league snapshot can be megabytes).

`pause_reading()` stops reading from the socket (a stalled player: the
kernel buffers fill and the server's output backs up); `resume_reading()`
reads again. (Not `pause`/`resume`: an oddsgate player's `resume` is the
protocol's, subscribing again from where it was.)
"""

from __future__ import annotations

import asyncio

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

MAX_HEADER_BYTES = 16384
_TEXT, _BINARY, _CONT, _CLOSE = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.CLOSE
_PLAIN_FIRST_BYTES = (0x80 | _TEXT, 0x80 | _BINARY)  # FIN, no RSV, text or binary


class WsClient(asyncio.Protocol):
    """Subclasses implement `on_open`, `on_message` and may override `on_lost`.

    Private names are mangled (`__name`): the adapters' classes have their own
    `_event`, `_need` and the like, and must not replace ours by accident.
    """

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str] | None = None):
        self.host = host
        self.port = port
        self.path = path
        self.extra_headers = headers or {}  # read when the connection is made
        self.transport: asyncio.Transport | None = None
        self.protocol: ClientProtocol | None = None
        self.upgraded = False  # the server answered 101: a later loss is a lost connection
        self.open = False
        self.closed = False
        self.close_code: int | None = None
        self.handshake_error: str | None = None
        self.__head = b""  # the handshake response, until its blank line
        self.__carry: list[bytes] = []  # a frame cut by the end of a read
        self.__carried = 0
        self.__need = 0  # bytes that complete the carried frame; 0: its header is cut
        self.__fragments: list[bytes] = []  # a fragmented message under way

    # -- asyncio callbacks ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        proto = self.protocol = ClientProtocol(
            parse_uri(f"ws://{self.host}:{self.port}{self.path}"), max_size=None)
        request = proto.connect()
        for name, value in self.extra_headers.items():
            request.headers[name] = value
        proto.send_request(request)
        self.__flush()

    def data_received(self, data: bytes) -> None:
        if self.__carry:
            self.__carry.append(data)
            self.__carried += len(data)
            if self.__carried < self.__need:
                return  # a big frame still arriving: join its parts once, at the end
            data = b"".join(self.__carry)
            self.__carry = []
        if not self.upgraded:
            data = self.__handshake(data)
        if data:
            self.__frames(data)

    def eof_received(self) -> bool | None:
        if self.protocol is not None:
            self.protocol.receive_eof()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self.closed = True
        self.on_lost(exc)

    # -- the incoming stream ----------------------------------------------

    def __handshake(self, data: bytes) -> bytes:
        """Give the protocol the response, and nothing after it; return what follows."""
        head = self.__head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_HEADER_BYTES:
                self.__fail("handshake response too large")
            else:
                self.__head = head
            return b""
        self.__head = b""
        proto = self.protocol
        assert proto is not None
        proto.receive_data(head[: end + 4])
        proto.events_received()
        if proto.state is State.OPEN:
            self.upgraded = True
            self.open = True
            self.on_open()
            return head[end + 4 :]
        proto.receive_data(head[end + 4 :])  # a refusal's body, if it came
        why = proto.handshake_exc or head[: head.find(b"\r\n")].decode(errors="replace")
        self.__fail(f"handshake refused: {why}")
        return b""

    def __frames(self, data: bytes) -> None:
        """Cut `data` into frames (RFC 6455 §5.2 lengths): plain ones to
        `on_message`, the others whole to the protocol; a cut one is carried."""
        pos = 0
        n = len(data)
        on_message = self.on_message
        while n - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            if b1 & 0x80:  # masked: the protocol refuses it (§5.1)
                head += 4
            end = pos + head + length
            if end > n:
                self.__carry = [data[pos:]]
                self.__carried = n - pos
                self.__need = end - pos
                return
            if b0 in _PLAIN_FIRST_BYTES and b1 < 0x80 and not self.__fragments:
                on_message(data[pos + head : end])
            elif not self.__to_protocol(data[pos:end]):
                return
            pos = end
        if pos < n:
            self.__carry = [data[pos:]]
            self.__carried = n - pos
            self.__need = 0

    def __to_protocol(self, frame_bytes: bytes) -> bool:
        """One whole frame through the protocol; False once the connection is closing."""
        proto = self.protocol
        assert proto is not None
        proto.receive_data(frame_bytes)
        for frame in proto.events_received():
            self.__event(frame)
        for out in proto.data_to_send():  # a pong; the close echo
            self.__write(out)
        if proto.state is State.OPEN:
            return True
        self.open = False
        if self.transport is not None:  # closed or failed: done, without waiting for the server
            self.transport.close()
        return False

    def __event(self, frame: Frame) -> None:
        """A data frame (a fragment, or any data frame during one), or a close;
        pings are answered and pongs ignored by the protocol itself."""
        opcode = frame.opcode
        if opcode is _TEXT or opcode is _BINARY or opcode is _CONT:
            if frame.fin and not self.__fragments:
                self.on_message(frame.data)
                return
            self.__fragments.append(frame.data)
            if frame.fin:
                message = b"".join(self.__fragments)
                self.__fragments = []
                self.on_message(message)
        elif opcode is _CLOSE:
            rcvd = self.protocol.close_rcvd if self.protocol is not None else None
            self.close_code = rcvd.code if rcvd is not None else 1005

    # -- helpers for subclasses and the load generator --------------------

    def __write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if data:
            self.transport.write(data)
        else:  # the protocol's end of stream
            self.transport.close()

    def __flush(self) -> None:
        if self.protocol is not None:
            for out in self.protocol.data_to_send():
                self.__write(out)

    def __fail(self, why: str) -> None:
        self.handshake_error = why
        if self.transport is not None:
            self.transport.abort()

    def send_text(self, payload: bytes) -> None:
        """One text frame, if the connection is open (else nothing, as a closed socket would)."""
        if self.open and self.protocol is not None:
            self.protocol.send_text(payload)
            self.__flush()

    def send_binary(self, payload: bytes) -> None:
        if self.open and self.protocol is not None:
            self.protocol.send_binary(payload)
            self.__flush()

    def close(self, code: int = 1000) -> None:
        if self.open and self.protocol is not None:
            self.open = False
            self.protocol.send_close(code)
            self.__flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    # -- hooks ------------------------------------------------------------

    def on_open(self) -> None:
        pass

    def on_message(self, payload: bytes) -> None:
        pass

    def on_lost(self, exc: Exception | None) -> None:
        pass
