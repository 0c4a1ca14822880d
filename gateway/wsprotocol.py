"""websockets' server protocol, with the request parsing a public HTTP endpoint needs.

websockets parses the opening request for a WebSocket server, not for the
plain HTTP a worker also serves (PROTOCOL.md §6). Left to itself it hands
any method to `process_request` (HEAD, DELETE and `get` were served as
GET), sends nothing at all when a request has a body or a transfer coding
(HAProxy turns the silence into a 502), and reads a second pipelined
request as WebSocket frames, which fails the connection before the first
answer leaves. `PlayerProtocol` reads the request head itself, asks
`gateway.http.judge_request` whether to serve it, and either answers the
refusal at once (405 with `Allow`, 400, 411, 413, 501, 505) or hands the
request on, with its body when it is a POST that takes one (exactly
Content-Length bytes, read within the handshake timeout that covers the
whole request). A plain request is the connection's only one: whatever
follows it is read and dropped while the answer is prepared, and the
answer says `Connection: close`, so pipelining is refused explicitly and
the first answer still arrives. Only a WebSocket upgrade goes on to frame
parsing.

`serve()` builds a plain `ServerProtocol` for every connection;
`PlayerProtocol.adopt` turns it into this class before the first byte is
read. Frame-level behaviour stays websockets' but for pings, which are
answered by the connection within its budget (`recv_frame` below).
"""

from __future__ import annotations

from collections.abc import Generator

from websockets.exceptions import (
    HeaderLineTooLong,
    InvalidMessage,
    RequestLineTooLong,
    TooManyHeaders,
)
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, parse_headers, parse_line
from websockets.protocol import CONNECTING, Protocol
from websockets.server import ServerProtocol

from gateway.http import BODY_METHODS, RequestWithBody, Verdict, judge_request


class PlayerProtocol(ServerProtocol):
    """A worker connection's sans-I/O protocol: oddsgate's HTTP rules, then WebSocket frames."""

    @classmethod
    def adopt(cls, protocol: ServerProtocol) -> PlayerProtocol:
        """Make the protocol `serve()` built a PlayerProtocol, before any data reaches it.

        The parser generator is created in `Protocol.__init__` from the class
        of that moment, so it is created again after the swap.
        """
        if not isinstance(protocol, cls):
            protocol.__class__ = cls
        protocol.parser = protocol.parse()
        next(protocol.parser)
        return protocol  # type: ignore[return-value]

    def parse(self) -> Generator[None]:
        if self.state is CONNECTING:
            verdict = yield from self.parse_request()
            if verdict is None:  # answered or abandoned; send_response replaced this parser
                yield
                raise AssertionError("parse() stepped after the request was refused")
            if not verdict.upgrade:
                # One plain request per connection: what follows (a pipelined
                # request, say) is dropped, and the answer says Connection: close.
                # Reading it keeps the kernel from answering our close with a RST
                # that could destroy the answer in flight.
                del verdict
                while not (yield from self.reader.at_eof()):
                    self.reader.discard()
                # The peer half-closed before the answer left. websockets' asyncio
                # connection closes the transport on EOF, so nobody is left to answer.
                self.abandon(InvalidMessage("connection closed before the answer"))
                yield
                raise AssertionError("parse() stepped after EOF")
            del verdict
        yield from Protocol.parse(self)

    def parse_request(self) -> Generator[None, None, Verdict | None]:
        """Read one request head; emit it as the handshake event, or refuse it here.

        Returns the verdict of a request to serve, or None when it was
        answered here (or the peer left mid-head, leaving nobody to answer).
        """
        read_line = self.reader.read_line
        try:
            line = yield from parse_line(read_line, RequestLineTooLong)
            parts = bytes(line).split(b" ")
            if len(parts) != 3 or not all(parts):
                raise ValueError(f"invalid request line: {bytes(line)[:80]!r}")
            method, target, version = (part.decode("ascii") for part in parts)
            headers = yield from parse_headers(read_line)
        except RequestLineTooLong as exc:
            self.refuse(Verdict(414, "request line too long"), exc)
            return None
        except (HeaderLineTooLong, TooManyHeaders) as exc:
            self.refuse(Verdict(431, "request header fields too large"), exc)
            return None
        except EOFError as exc:
            if not self.reader.eof:  # a line ending in a bare LF: malformed, not gone
                self.refuse(Verdict(400, "request lines end with CRLF"), exc)
                return None
            gone = InvalidMessage("connection closed during the request head")
            gone.__cause__ = exc
            self.abandon(gone)
            return None
        except (ValueError, UnicodeDecodeError) as exc:
            self.refuse(Verdict(400, "malformed request"), exc)
            return None
        verdict = judge_request(method, target, version, headers)
        if not verdict.serve:
            self.refuse(verdict, InvalidMessage(f"{method[:16]} {target[:80]}: {verdict.message}"))
            return None
        if method not in BODY_METHODS:
            self.events.append(Request(target, headers, method, version))
            return verdict
        try:
            body = yield from self.reader.read_exact(verdict.body_length)
        except EOFError as exc:  # nobody is left to answer
            gone = InvalidMessage("connection closed during the request body")
            gone.__cause__ = exc
            self.abandon(gone)
            return None
        self.events.append(RequestWithBody(target, headers, method, version, body=bytes(body)))
        return verdict

    def recv_frame(self, frame: Frame) -> None:
        """A ping is left to the connection, which answers it within the
        connection's request budget (PlayerConnection.process_event); websockets
        would queue a pong for every ping as it parses them."""
        if frame.opcode is Opcode.PING:
            self.events.append(frame)  # all that websockets does for a ping but the pong
            return
        super().recv_frame(frame)

    def refuse(self, verdict: Verdict, exc: Exception) -> None:
        """Answer a refused request now: no route runs, the connection then closes."""
        self.handshake_exc = exc
        self.send_response(verdict.response())

    def abandon(self, exc: Exception) -> None:
        """End a handshake the peer walked away from, as websockets does: EOF, then CLOSED."""
        self.handshake_exc = exc
        self.send_eof()
        self.parser = self.discard()
        next(self.parser)
