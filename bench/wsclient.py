"""A minimal WebSocket client as a plain asyncio protocol (RFC 6455), for load.

The load generator holds tens of thousands of these, so a connection is one
protocol object: no task, no queue, no coroutine per frame. It writes the
opening handshake itself, parses the server's frames straight out of the
bytes `data_received` is given, answers pings, and hands each complete text
or binary message to `on_message` (a subclass hook). No extensions are
offered, so no compression.

`pause_reading()` stops reading from the socket (a stalled player: the
kernel buffers fill and the server's output backs up); `resume_reading()`
reads again. (Not `pause`/`resume`: an oddsgate player's `resume` is the
protocol's, subscribing again from where it was.)
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_HEADER_BYTES = 16384


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, final frame (client frames must be masked, §5.3)."""
    n = len(payload)
    head = bytes((0x80 | opcode,))
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 65536:
        head += struct.pack("!BH", 0x80 | 126, n)
    else:
        head += struct.pack("!BQ", 0x80 | 127, n)
    key = os.urandom(4)
    if n:
        repeated = (key * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
            n, "big"
        )
    return head + key + payload


class WsClient(asyncio.Protocol):
    """Subclasses implement `on_open`, `on_message` and may override `on_lost`."""

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str] | None = None):
        self.host = host
        self.port = port
        self.path = path
        self.extra_headers = headers or {}
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.closed = False
        self.close_code: int | None = None
        self._handshaking = True
        self._buf = b""
        self._fragments: list[bytes] = []
        self._fragment_op = 0
        self.handshake_error: str | None = None

    # -- asyncio callbacks ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        lines += [f"{k}: {v}" for k, v in self.extra_headers.items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if self._handshaking:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEADER_BYTES:
                    self._fail("handshake response too large")
                else:
                    self._buf = data
                return
            status = data[: data.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self._fail(f"handshake refused: {status.decode(errors='replace')}")
                return
            self._handshaking = False
            self.open = True
            data = data[end + 4 :]
            self.on_open()
            if not data:
                return
        self._frames(data)

    def _frames(self, data: bytes) -> None:
        pos = 0
        n = len(data)
        on_message = self.on_message
        while n - pos >= 2:
            b0 = data[pos]
            length = data[pos + 1] & 0x7F
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
            end = pos + head + length
            if end > n:
                break
            opcode = b0 & 0x0F
            payload = data[pos + head : end]
            pos = end
            if b0 & 0x80 and opcode in (OP_TEXT, OP_BINARY):
                on_message(payload)
            elif opcode in (OP_TEXT, OP_BINARY, OP_CONT):
                self._fragment(b0, opcode, payload)
            elif opcode == OP_PING:
                self._write_frame(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                self._on_close_frame(payload)
                return
        if pos < n:
            self._buf = data[pos:]

    def _fragment(self, b0: int, opcode: int, payload: bytes) -> None:
        if opcode != OP_CONT:
            self._fragments = [payload]
            self._fragment_op = opcode
        else:
            self._fragments.append(payload)
        if b0 & 0x80:
            message = b"".join(self._fragments)
            self._fragments = []
            self.on_message(message)

    def _on_close_frame(self, payload: bytes) -> None:
        self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        if self.open:
            self.open = False
            self._write_frame(OP_CLOSE, payload[:2])
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self.closed = True
        self.on_lost(exc)

    # -- helpers for subclasses and the load generator --------------------

    def _fail(self, why: str) -> None:
        self.handshake_error = why
        if self.transport is not None:
            self.transport.abort()

    def _write_frame(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(opcode, payload))

    def send_text(self, payload: bytes) -> None:
        self._write_frame(OP_TEXT, payload)

    def close(self, code: int = 1000) -> None:
        if self.open:
            self.open = False
            self._write_frame(OP_CLOSE, code.to_bytes(2, "big"))
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
