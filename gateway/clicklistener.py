"""The click listener: a lean HTTP/1.1 server of one worker for `GET /t/{code}` only.

Why a second listener: on the worker's port every request goes through
websockets' handshake machinery (a task, timeouts, request and response
objects per connection), and HAProxy opened one connection per click
(the worker answers plain HTTP with `Connection: close`). A click then cost
the worker ~340 us of CPU, 40% of it websockets'. Here HAProxy keeps its
connections to the listener alive (`http-reuse always`, README "Tracking
links"), a request head is parsed by hand, and a click is answered from
callbacks: no task, no coroutine per request.

Two parts, as websockets splits its own:

- `HeadReader` is the parser and never awaits: bytes go in (`feed`), request
  heads or refusals come out (`next`). It implements RFC 9112 §2-§6 as far
  as a bodiless GET needs: request line, header fields, framing, with
  limits enforced where the bytes are parsed (414 for a request line over
  MAX_LINE, 431 for a header line over MAX_LINE, more than MAX_FIELDS
  fields or a head over MAX_HEAD). The tests feed it bytes with no loop.
- `ClickConnection` (an asyncio.Protocol) only moves bytes: it asks the
  reader for heads, hands each to `attribution.tracking.TrackingRoute`
  (`begin`: the refusal, or the click planned and handed to the recorder),
  and writes the answers in request order as they become ready: a
  pipelined click waits for the ones before it, so answers never overtake
  each other (RFC 9112 §9.3.2). The 302 is written only once the recorder's
  future says the click is in Redis (`settle`), as on the worker's port.

What it serves: GET and HEAD of `/t/{code}` (HEAD: the GET's head, no
body); `/t/` with another method is 405 with `Allow: GET, HEAD`; any other
path 404. Every answer of the worker's port for `/t/` is the same here
(`Answer` is shared), but for the connection staying open. A malformed
head is 400 (bare LF, a bad request line or field, a missing or doubled
Host in HTTP/1.1, a bad Content-Length), an unknown version 505, a
transfer coding 501 (400 next to a Content-Length or in HTTP/1.0), a body
on GET or HEAD 413; after any of those, or a 404/405 whose request
announced a body, the answer says `Connection: close` and the connection
closes, since where the next request would start is not known.

Keep-alive (RFC 9112 §9.3): HTTP/1.1 stays open unless either side says
`Connection: close`; HTTP/1.0 closes unless the request says
`Connection: keep-alive` (then the answer says it too). While the worker
drains, every answer says `Connection: close`, so HAProxy's pool lets go
of a worker that is going away. A connection idle longer than IDLE_S, or
holding a partial head longer than HEAD_S, is closed by a sweep once a
second (one timer for all connections, none per request). At most
MAX_IN_FLIGHT pipelined requests wait per connection: past that the
connection stops reading until answers leave, and it stops reading too
while its transport's write buffer is over the high-water mark.

Never crashes the worker: an exception while answering one request is
logged and answered 500 (then the connection closes); one in the
protocol's own code closes that connection only.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from attribution.tracking import PREFIX, Answer, Planned, Refusal, TrackingRoute
from gateway.http import SERVER_HEADER

log = logging.getLogger("oddsgate.clicks")

MAX_LINE = 8192  # request line (414) or one header line (431), as websockets' limit
MAX_FIELDS = 100  # header fields per request (431)
MAX_HEAD = 16 * 1024  # a whole head, request line and fields (431)
MAX_IN_FLIGHT = 16  # pipelined requests waiting for their answer, per connection
IDLE_S = 75.0  # an idle keep-alive connection is closed after this (HAProxy's pool lets go first)
HEAD_S = 10.0  # a request head must be complete this long after its first byte (slowloris)
LINGER_S = 2.0  # after its last answer, how long a closing connection reads and drops input
ALLOW = "GET, HEAD"

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_TARGET = re.compile(rb"[\x21-\x7e]+")  # printable ASCII, no space (RFC 9112 §3.2)
# Every octet a head may hold: field values are RFC 9110 §5.5's (as websockets reads them),
# checked once over the whole head rather than field by field
_HEAD_OCTETS = re.compile(rb"[\t\r\n\x20-\x7e\x80-\xff]*")
_DIGITS = re.compile(r"[0-9]{1,18}")


class Fields:
    """A request's header fields by lower-case name; read like websockets' `Headers`."""

    __slots__ = ("by_name",)

    def __init__(self, by_name: dict[str, list[str]]) -> None:
        self.by_name = by_name

    def get(self, name: str) -> str | None:
        values = self.by_name.get(name.lower())
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        return self.by_name.get(name.lower(), [])

    def tokens(self, name: str) -> set[str]:
        """The comma-separated tokens of a list field (Connection), lower case."""
        return {part.strip().lower() for value in self.get_all(name)
                for part in value.split(",") if part.strip()}


@dataclass(frozen=True, slots=True)
class Head:
    """One request head the listener serves or refuses by its path and method."""

    method: str
    target: str
    version: str
    fields: Fields
    keep_alive: bool  # what the request asks for (RFC 9112 §9.3)
    has_body: bool  # a Content-Length over 0: the connection closes after the answer


@dataclass(frozen=True, slots=True)
class BadHead:
    """A head refused as it was parsed; the connection closes after its answer."""

    status: int
    message: str


class HeadReader:
    """Bytes in, request heads out; never awaits (RFC 9112)."""

    __slots__ = ("buffer", "started_at")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.started_at: float | None = None  # when the pending head's first byte came

    def feed(self, data: bytes, now: float = 0.0) -> None:
        if not self.buffer and data:
            self.started_at = now
        self.buffer += data

    @property
    def partial(self) -> bool:
        """Whether bytes of a head not yet complete are waiting."""
        return bool(self.buffer)

    def next(self, now: float = 0.0) -> Head | BadHead | None:
        """The next head, a refusal (the reader is then spent), or None: more bytes needed."""
        buffer = self.buffer
        # RFC 9112 §2.2: empty lines before a request line are ignored.
        while buffer[:2] == b"\r\n":
            del buffer[:2]
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if b"\n" in buffer and buffer.count(b"\n") != buffer.count(b"\r\n"):
                return BadHead(400, "request lines end with CRLF")
            first = buffer.find(b"\r\n")
            if (first if first >= 0 else len(buffer)) > MAX_LINE:
                return BadHead(414, "request line too long")
            if len(buffer) > MAX_HEAD:
                return BadHead(431, "request header fields too large")
            if not buffer:
                self.started_at = None
            return None
        head = bytes(buffer[:end])
        del buffer[:end + 4]
        self.started_at = now if buffer else None
        return parse_head(head)


def parse_head(head: bytes) -> Head | BadHead:
    """One head without its final CRLF CRLF (RFC 9112 §3, §5, §6)."""
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
        return BadHead(400, "request lines end with CRLF")
    if not _HEAD_OCTETS.fullmatch(head):
        return BadHead(400, "malformed request")
    lines = head.split(b"\r\n")
    line = lines[0]
    if len(line) > MAX_LINE:
        return BadHead(414, "request line too long")
    if len(head) > MAX_HEAD:
        return BadHead(431, "request header fields too large")
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        return BadHead(400, "malformed request")
    method, target, version = parts
    if not _VERSION.fullmatch(version):
        return BadHead(400, "bad request line")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        return BadHead(505, "HTTP/1.1 or HTTP/1.0 only")
    if not _TOKEN.fullmatch(method):
        return BadHead(400, "bad request method")
    if not _TARGET.fullmatch(target) or not target.startswith((b"/", b"http://", b"https://")):
        return BadHead(400, "bad request target")
    if len(lines) - 1 > MAX_FIELDS:
        return BadHead(431, "request header fields too large")
    by_name: dict[str, list[str]] = {}
    for raw in lines[1:]:
        if len(raw) > MAX_LINE:
            return BadHead(431, "request header fields too large")
        name, colon, value = raw.partition(b":")
        # no whitespace before the colon (RFC 9112 §5.1), no obs-fold (§5.2)
        if not colon or not _TOKEN.fullmatch(name):
            return BadHead(400, "malformed request")
        value = value.strip(b" \t")
        by_name.setdefault(name.decode("ascii").lower(), []).append(value.decode("latin-1"))
    fields = Fields(by_name)
    text_version = version.decode("ascii")
    if text_version == "HTTP/1.1" and len(fields.get_all("host")) != 1:
        return BadHead(400, "HTTP/1.1 needs exactly one Host")  # RFC 9112 §3.2
    if "transfer-encoding" in by_name:
        if "content-length" in by_name:
            return BadHead(400, "both Transfer-Encoding and Content-Length")
        if text_version == "HTTP/1.0":
            return BadHead(400, "Transfer-Encoding in an HTTP/1.0 request")
        return BadHead(501, "transfer codings are not implemented; requests have no body")
    lengths = {part.strip() for value in fields.get_all("content-length")
               for part in value.split(",")}
    length = 0
    if lengths:
        if len(lengths) > 1 or not all(_DIGITS.fullmatch(v) for v in lengths):
            return BadHead(400, "bad Content-Length")
        length = int(lengths.pop())
    connection = fields.tokens("connection")
    keep_alive = ("close" not in connection if text_version == "HTTP/1.1"
                  else "keep-alive" in connection)
    return Head(method.decode("ascii"), target.decode("ascii"), text_version, fields,
                keep_alive, length > 0)


NOT_FOUND = Refusal(404, "not_found", "this listener serves /t/{code} only")


def refusal_answer(status: int, message: str, allow: str | None = None) -> Answer:
    headers: tuple[tuple[str, str], ...] = (("Cache-Control", "no-store"),)
    if allow is not None:
        headers += (("Allow", allow),)
    return Answer(status, headers, (message + "\n").encode())


_REASONS = {status.value: status.phrase for status in http.HTTPStatus}


class DateCache:
    """The Date header (RFC 9110 §6.6.1), formatted once a second, not once an answer."""

    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.value = email.utils.formatdate(second, usegmt=True).encode()
        return self.value


def encode_answer(answer: Answer, date: bytes, *, head_only: bool,
                  connection: str | None) -> bytes:
    """The answer's bytes: status line, headers, and the body unless it answers a HEAD
    (whose Content-Length is still the GET's, RFC 9110 §9.3.2)."""
    lines = [b"HTTP/1.1 %d %s" % (answer.status, _REASONS.get(answer.status, "").encode()),
             b"Date: " + date, b"Server: " + SERVER_HEADER.encode(),
             b"Content-Length: %d" % len(answer.body),
             b"Content-Type: " + answer.content_type.encode()]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in answer.headers]
    if connection is not None:
        lines.append(b"Connection: " + connection.encode())
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    return head if head_only else head + answer.body


class _Slot:
    """One request's place in its connection's answer order."""

    __slots__ = ("close", "data")

    def __init__(self, data: bytes | None = None, close: bool = False) -> None:
        self.data = data  # None until the answer is ready
        self.close = close  # the connection closes once this answer is written


class ClickConnection(asyncio.Protocol):
    """One connection (usually HAProxy's, kept alive): reads heads, writes answers in order."""

    __slots__ = (
        "closing",
        "last_active",
        "lingering_since",
        "listener",
        "peer",
        "peer_done",
        "reader",
        "reading",
        "slots",
        "transport",
        "writing",
    )

    def __init__(self, listener: ClickListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.reader = HeadReader()
        self.slots: deque[_Slot] = deque()
        self.closing = False  # no more requests are read; close once the answers are out
        self.last_active = 0.0
        self.reading = True
        self.writing = True
        self.lingering_since: float | None = None  # last answer out, write side shut
        self.peer_done = False  # the peer shut its side (EOF)

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        self.last_active = self.listener.loop.time()
        self.listener.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.listener.connections.discard(self)
        # Clicks still waiting on Redis are recorded anyway; their answers have nowhere to go.

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # after a refusal or Connection: close, nothing more is read
        self.last_active = now = self.listener.loop.time()
        self.reader.feed(data, now)
        try:
            self._serve(now)
        except Exception:
            log.exception("click connection from %s failed; closed", self.peer)
            self._abort()

    def eof_received(self) -> bool:
        """The peer sent all it will: answer what was asked, then close (keep no half-open)."""
        if self.lingering_since is not None:
            return False  # our side was done already: close
        self.peer_done = True
        self.closing = True
        self._flush()
        return True  # keep the transport open for the answers still due

    def pause_writing(self) -> None:
        self.writing = False
        self._pause()

    def resume_writing(self) -> None:
        self.writing = True
        self._serve(self.listener.loop.time())

    # -- requests and answers ----------------------------------------------------------

    def _serve(self, now: float) -> None:
        """Take complete heads while answers may queue, write what is ready in order, and
        go on while that made room for heads already buffered; then read on or pause.

        A loop, not recursion: a client may pipeline thousands of requests in one read.
        """
        while self.lingering_since is None:
            while not self.closing and self.writing and len(self.slots) < MAX_IN_FLIGHT:
                head = self.reader.next(now)
                if head is None:
                    break
                slot = self.listener.answer(head, self)
                self.slots.append(slot)
                if slot.close:
                    self.closing = True
            wrote = self._write_ready()
            if not (wrote and not self.closing and self.writing and self.reader.partial
                    and len(self.slots) < MAX_IN_FLIGHT):
                break
        transport = self.transport
        if transport is None or transport.is_closing() or self.lingering_since is not None:
            return
        if self.closing or not self.writing or len(self.slots) >= MAX_IN_FLIGHT:
            self._pause()
        elif not self.reading:
            self.reading = True
            transport.resume_reading()

    def _pause(self) -> None:
        if self.reading and self.transport is not None and not self.transport.is_closing():
            self.reading = False
            self.transport.pause_reading()

    def _write_ready(self) -> bool:
        """Write the ready answers at the head of the line, in request order; close after
        the last one when the connection is closing. Whether anything was written."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        slots = self.slots
        wrote = False
        while slots and slots[0].data is not None:
            slot = slots.popleft()
            transport.write(slot.data)
            wrote = True
            if slot.close:
                self._finish()
                return True
        if self.closing and not slots:
            self._finish()
        return wrote

    def _flush(self) -> None:
        """An answer became ready, the peer is done, or the listener closes: write what
        can be written and take what the freed room allows."""
        self._serve(self.listener.loop.time())

    def _finish(self) -> None:
        """Close after the last answer without losing it: shut our side, then read and
        drop what the peer still sends (a body never read, pipelined requests) until it
        closes or LINGER_S passes. Closing with unread input would make the kernel answer
        with a reset, which can destroy the answer in flight (RFC 9112 §9.6)."""
        self.closing = True
        self.slots.clear()
        transport = self.transport
        if transport is None or transport.is_closing() or self.lingering_since is not None:
            return
        if self.peer_done or not transport.can_write_eof():
            transport.close()  # nothing more can come: close once the answers are out
            return
        transport.write_eof()
        self.lingering_since = self.listener.loop.time()
        if not self.reading:
            self.reading = True
            transport.resume_reading()

    def ready(self, slot: _Slot, data: bytes) -> None:
        """A waiting answer is ready (a recorder callback)."""
        slot.data = data
        try:
            self._flush()
        except Exception:
            log.exception("click connection from %s failed; closed", self.peer)
            self._abort()

    def _abort(self) -> None:
        self.closing = True
        self.slots.clear()
        if self.transport is not None:
            self.transport.abort()

    def idle_for(self, now: float) -> float:
        return now - self.last_active


class ClickListener:
    """The listening socket of `/t/` in one worker, and its connections."""

    def __init__(self, route: TrackingRoute, *, draining: Callable[[], bool] = lambda: False,
                 idle_s: float = IDLE_S, head_s: float = HEAD_S) -> None:
        self.route = route
        self.draining = draining
        self.idle_s = idle_s
        self.head_s = head_s
        self.connections: set[ClickConnection] = set()
        self.date = DateCache()
        self.server: asyncio.Server | None = None
        self._sweeper: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop

    async def start(self, host: str, port: int, *, reuse_port: bool = False,
                    backlog: int = 1024) -> None:
        self.loop = asyncio.get_running_loop()
        self.server = await self.loop.create_server(
            lambda: ClickConnection(self), host, port, reuse_port=reuse_port or None,
            backlog=backlog)
        self._sweeper = self.loop.create_task(self._sweep())

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    def stop_listening(self) -> None:
        """Close the listening socket only (a reload: the successor takes new connections
        on the same port); the connections HAProxy holds are served until they close."""
        if self.server is not None:
            self.server.close()

    async def close(self, grace_s: float = 1.0) -> None:
        """Stop listening, close idle connections now and busy ones once their answers
        are out (within `grace_s`), then cut what is left."""
        self.stop_listening()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.closing = True
            conn._flush()
        deadline = self.loop.time() + grace_s
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn._abort()

    async def _sweep(self) -> None:
        """Close idle keep-alive connections and heads that take too long (one timer)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                self._close_stale(self.loop.time())
            except Exception:
                log.exception("click listener sweep failed")

    def _close_stale(self, now: float) -> None:
        for conn in list(self.connections):
            if conn.lingering_since is not None:
                if now - conn.lingering_since > LINGER_S and conn.transport is not None:
                    conn.transport.close()
                continue
            if conn.slots:
                continue  # an answer is owed: not idle
            started = conn.reader.started_at
            if (conn.reader.partial and started is not None
                    and now - started > self.head_s) or conn.idle_for(now) > self.idle_s:
                conn.closing = True
                conn._flush()

    # -- one request ---------------------------------------------------------------------

    def answer(self, head: Head | BadHead, conn: ClickConnection) -> _Slot:
        """The slot of one request: its answer now, or once its click is recorded."""
        if isinstance(head, BadHead):
            return self._slot(refusal_answer(head.status, head.message), head_only=False,
                              close=True, version="HTTP/1.1")
        close = not head.keep_alive or head.has_body or self.draining()
        head_only = head.method == "HEAD"
        try:
            url = urlsplit(head.target)
        except ValueError:  # an absolute-form target with a broken authority
            return self._slot(refusal_answer(400, "bad request target"), head_only=False,
                              close=True, version=head.version)
        try:
            path = url.path if head.target.startswith("/") else (url.path or "/")
            if not path.startswith(PREFIX):
                return self._slot(NOT_FOUND.answer(), head_only=head_only, close=close,
                                  version=head.version)
            if head.method not in ("GET", "HEAD"):
                return self._slot(refusal_answer(
                    405, f"{head.method[:16]} not allowed here; {ALLOW} only", ALLOW),
                    head_only=False, close=close, version=head.version)
            if head.has_body:
                return self._slot(refusal_answer(413, "requests to this server have no body"),
                                  head_only=head_only, close=True, version=head.version)
            begun = self.route.begin(path, parse_qs(url.query), head.method, head.fields,
                                     conn.peer)
        except Exception:
            log.exception("click request %s %s failed", head.method, head.target[:80])
            return self._slot(refusal_answer(500, "internal error"), head_only=head_only,
                              close=True, version=head.version)
        if isinstance(begun, Answer):
            return self._slot(begun, head_only=head_only, close=close, version=head.version)
        slot = _Slot(close=close)
        connection = self._connection_header(close, head.version)

        def recorded(_: asyncio.Future, planned: Planned = begun) -> None:
            try:
                answer = self.route.settle(planned)
            except Exception:
                log.exception("click answer failed")
                answer = refusal_answer(500, "internal error")
                slot.close = True
            conn.ready(slot, encode_answer(answer, self.date.now(), head_only=head_only,
                                           connection="close" if slot.close else connection))

        begun.recorded.add_done_callback(recorded)
        return slot

    def _slot(self, answer: Answer, *, head_only: bool, close: bool, version: str) -> _Slot:
        return _Slot(encode_answer(answer, self.date.now(), head_only=head_only,
                                   connection=self._connection_header(close, version)),
                     close)

    @staticmethod
    def _connection_header(close: bool, version: str) -> str | None:
        if close:
            return "close"
        return "keep-alive" if version == "HTTP/1.0" else None
