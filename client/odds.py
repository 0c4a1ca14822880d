"""An oddsgate client for bots, tests and benchmarks (PROTOCOL.md §2-§5).

One `OddsClient` is one player connection that survives reconnects: after any
disconnect it waits as told (a ``reconnect`` frame's ``after_ms``) or backs
off, reconnects and resumes every topic from the last event it holds, so the
caller sees one continuous stream per topic. Everything received is fed to a
`RuleChecker`, which is also where the held state lives (`client.topics`), so
each resume is checked against exactly what was held before it.

Given several region URLs (PROTOCOL.md §8) it also fails over: when its
region cannot be reached, or drains with ``reconnect`` reason
``region_drain``, it connects to the next region and resumes there through
the same checker, so a ``reset`` or a broken order after a failover shows as
it would after any reconnect. `RegionRing` decides where each attempt goes
and when to back off.

Built for thousands of connections in one process: each frame is decoded once
with orjson and an event costs a few dict operations; nothing is logged per
event. The pure pieces (`backoff_delay`, `connection_target`, `close_info`,
`moves_region`, `RegionRing`) are tested without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.uri import parse_uri

from client.rules import RuleChecker, TopicState, Violation

log = logging.getLogger(__name__)

ResumePoint = Mapping[str, Any]  # {"epoch": str, "seq": int}
Message = dict[str, Any]

BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 5.0
# Close codes after which retrying cannot help (§4): policy, too big (our
# request was), repeated bad requests, unauthorized, rate limited.
TERMINAL_CLOSE_CODES = frozenset({1008, 1009, 4400, 4401, 4429})
# Refusals of a subscribe that name topics and leave the rest accepted (§3).
SHED = "shed"
# The `reconnect` reason that drains a whole region (§8): go to another one.
REGION_DRAIN = "region_drain"

_DEFAULT_WS_OPTIONS: dict[str, Any] = {
    "compression": None,  # §2: none unless offered; it costs CPU at fleet scale
    "max_size": 2**24,  # a league-level snapshot can be large
    "open_timeout": 10,
}


# -- pure helpers -------------------------------------------------------------


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before reconnect `attempt` (0-based): full jitter.

    A fleet of clients dropped together must not return together, so the
    wait is uniform in [0, min(cap, base * 2**attempt)].
    """
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, 32))
    return (rng or random).uniform(0.0, ceiling)


def connection_target(
    url: str, token: str | None, token_in: Literal["cookie", "query"]
) -> tuple[str, dict[str, str]]:
    """The URL and extra headers that carry `token` the way §2 allows.

    The cookie is what HAProxy hashes on for stickiness, so it is the
    default; the query parameter is for clients that cannot set cookies.
    """
    if token is None:
        return url, {}
    if token_in == "cookie":
        return url, {"Cookie": f"og_session={token}"}
    if token_in != "query":
        raise ValueError(f"token_in must be 'cookie' or 'query', not {token_in!r}")
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    query.append(("token", token))
    return urlunsplit(parts._replace(query=urlencode(query))), {}


@dataclass(frozen=True, slots=True)
class CloseInfo:
    """Why a connection ended: a close code, or an HTTP refusal before the upgrade."""

    code: int | None
    reason: str = ""
    http_status: int | None = None

    @property
    def terminal(self) -> bool:
        """True when reconnecting would be refused again (bad token, policy...)."""
        if self.http_status is not None:
            # 401/403: the token; other 4xx but 408/429: the request itself.
            return 400 <= self.http_status < 500 and self.http_status not in (408, 429)
        return self.code in TERMINAL_CLOSE_CODES


def close_info(exc: ConnectionClosed) -> CloseInfo:
    """The close as the server sent it; 1006 when no close frame came."""
    frame = exc.rcvd or exc.sent
    if frame is None:
        return CloseInfo(1006, "connection lost")
    return CloseInfo(frame.code, frame.reason)


def moves_region(reason: object) -> bool:
    """Whether a ``reconnect`` frame's `reason` sends the client to another region.

    Only ``region_drain`` does (§8: the whole region is going away for a
    deploy). ``drain``, ``restart`` and ``overload`` concern one worker:
    the same URL, which HAProxy routes to another worker, is right for them.
    """
    return reason == REGION_DRAIN


class RegionRing:
    """Where the next connection attempt goes, and whether to back off first (§8).

    Plain state, no I/O: the client asks `current` for the URL to try and
    reports each outcome. A failed attempt moves to the next region at once;
    only when every region has failed in a row (a whole pass round the ring)
    does `failed` say to back off, and the next pass starts where the last
    one ended, wrapping around. So with regions [A, B, C] and all down the
    attempts go A B C, wait, A B C, wait longer...; each region sees one
    attempt per backoff, as a single-region client's server does. With one
    URL every failure backs off, which is the single-region behaviour.

    A drop of a working connection is not a failure of the region: the
    client tries the same region again first (`current` is unchanged), and
    moves only if that attempt fails. A ``region_drain`` is a failure
    announced in advance: `leave` moves on without counting one, and the
    drained region comes last in the pass that follows.
    """

    __slots__ = ("failed_in_a_row", "index", "urls")

    def __init__(self, urls: Sequence[str]) -> None:
        if isinstance(urls, str) or not urls:
            raise ValueError("RegionRing needs a non-empty sequence of URLs")
        self.urls: tuple[str, ...] = tuple(urls)
        self.index = 0  # the region the next attempt goes to
        self.failed_in_a_row = 0  # attempts failed since the last that connected

    def __repr__(self) -> str:
        return f"<RegionRing {self.current} failed_in_a_row={self.failed_in_a_row}>"

    @property
    def current(self) -> str:
        """The URL the next attempt goes to (the one connected to, while connected)."""
        return self.urls[self.index]

    def connected(self) -> None:
        """The attempt at `current` was welcomed: the region serves."""
        self.failed_in_a_row = 0

    def failed(self) -> bool:
        """The attempt at `current` failed: move to the next region.

        Returns True when that completed a pass of failures over every
        region, i.e. the caller backs off before the next attempt; False
        when the next region is to be tried at once.
        """
        self.failed_in_a_row += 1
        self.index = (self.index + 1) % len(self.urls)
        return self.failed_in_a_row % len(self.urls) == 0

    def leave(self) -> None:
        """The current region is draining (``region_drain``): the next attempt
        goes to the next region. With one URL there is nowhere else to go."""
        self.index = (self.index + 1) % len(self.urls)


# -- results and errors -------------------------------------------------------


class ClientClosed(Exception):
    """The client stopped for good; `info` says why."""

    def __init__(self, info: CloseInfo) -> None:
        super().__init__(f"closed: code={info.code} http={info.http_status} {info.reason}")
        self.info = info


class _Terminal(Exception):
    """Inside the reconnect loop: a refusal that ends the client (`info`)."""

    def __init__(self, info: CloseInfo) -> None:
        super().__init__(info.reason)
        self.info = info


class Disconnected(ConnectionError):
    """The connection dropped while a request waited; the client may be resuming."""


class RequestError(Exception):
    """The server refused a whole request with an ``error`` frame (§4)."""

    def __init__(self, error: Message) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.error = error
        self.code: str | None = error.get("code")


@dataclass(slots=True)
class SubscribeResult:
    """The ``subscribed`` reply and the ``error`` frames that came before it (§3)."""

    accepted: list[str]
    errors: list[Message]

    @property
    def refused(self) -> dict[str, str]:
        """Refused topic -> error code."""
        return {t: e.get("code", "") for e in self.errors for t in e.get("topics") or ()}


@dataclass(slots=True)
class ClientStats:
    """Counters; plain ints so the hot path only does `+= 1`."""

    frames: int = 0
    events: int = 0
    batches: int = 0
    snapshots: int = 0
    resets: int = 0
    coalesced: int = 0
    errors: int = 0
    reconnects: int = 0  # connections re-established after the first
    resumes: int = 0  # of those, the ones whose re-subscribe was answered
    failovers: int = 0  # of those, the ones to another region than the connection before
    connect_failures: int = 0  # attempts that did not get to a welcome, every region
    backoffs: int = 0  # backoff waits: every region had failed in a row


@dataclass(slots=True)
class _Pending:
    op: str
    future: asyncio.Future[Any]
    errors: list[Message] = field(default_factory=list)


# -- the client ---------------------------------------------------------------


class OddsClient:
    """One player's connection to oddsgate, resumed across disconnects."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        token_in: Literal["cookie", "query"] = "cookie",
        reconnect: bool = True,
        name: str | None = None,
        on_message: Callable[[Message], None] | None = None,
        record_latency: bool = False,
        ws_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`url` is one URL (``ws://host:port/ws``), or a sequence of region
        URLs (PROTOCOL.md §8): the first connection goes to the first that
        answers, and each later one follows `RegionRing` (the same region
        after a drop, the next one when that fails or the region drains).
        The token goes to every region.

        `on_message` runs in the reader for every message (each event of a
        batch on its own) after the client has applied it; it must not block.
        `ws_options` go to `websockets.asyncio.client.connect`, over the
        defaults (no compression, 16 MiB frames, 10 s open timeout).
        """
        urls = (url,) if isinstance(url, str) else tuple(url)
        if not urls:
            raise ValueError("OddsClient needs at least one URL")
        for each in urls:
            parse_uri(each)  # fail early on a URL that is not ws:// or wss://
            connection_target(each, token, token_in)  # and on a bad token_in
        self.regions = RegionRing(urls)
        self.token = token  # read at every (re)connect: a refreshed token is used
        self.token_in = token_in
        self.reconnect = reconnect
        self.name = name or ",".join(urls)
        self.on_message = on_message
        self.record_latency = record_latency
        self.ws_options = {**_DEFAULT_WS_OPTIONS, **(ws_options or {})}

        self.checker = RuleChecker()
        self.stats = ClientStats()
        self.latencies_ns: list[int] = []
        self.errors: list[Message] = []  # error frames no request was waiting for
        self.welcome: Message | None = None
        self.subscriptions: set[str] = set()  # topics the server accepted and we keep
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.closed_reason: CloseInfo | None = None

        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lifecycle: asyncio.Task[None] | None = None
        self._after_ms: int | None = None  # from the last `reconnect` frame
        self._leave_region = False  # and whether its reason drains the region
        self._region_index: int | None = None  # of the connection last welcomed
        self._closing = False
        self._stop = asyncio.Event()
        self._sync_waiters: list[tuple[set[str], asyncio.Future[None]]] = []
        self._resume_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._side_tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        state = "connected" if self.connected.is_set() else "down"
        if self.closed.is_set():
            state = "closed"
        return f"<OddsClient {self.name} {state} topics={len(self.subscriptions)}>"

    # -- state views -----------------------------------------------------------

    @property
    def urls(self) -> tuple[str, ...]:
        """Every region URL the client may use, in the order given."""
        return self.regions.urls

    @property
    def url(self) -> str:
        """The URL in use: the region's the client is on, else the first given."""
        return self.region_url or self.regions.urls[0]

    @property
    def region_url(self) -> str | None:
        """The URL of the region of the connection last welcomed (while
        reconnecting, the one just left); None before the first welcome."""
        if self._region_index is None:
            return None
        return self.regions.urls[self._region_index]

    @property
    def region(self) -> str | None:
        """The ``region`` the last ``welcome`` named (§2, §8); None before the
        first welcome, or when the server does not name one."""
        region = self.welcome.get("region") if self.welcome is not None else None
        return region if isinstance(region, str) else None

    @property
    def topics(self) -> dict[str, TopicState]:
        """Per topic: `epoch`, `seq`, `markets` (market -> newest event), as held."""
        return self.checker.topics

    @property
    def violations(self) -> list[Violation]:
        """§5 breaches seen so far (the first `checker.max_recorded` of them)."""
        return self.checker.violations

    def resume_points(self, topics: Iterable[str] | None = None) -> dict[str, Any]:
        """What a subscribe resuming `topics` (default: all kept) would send."""
        held = self.checker.topics
        out: dict[str, Any] = {}
        for topic in self.subscriptions if topics is None else topics:
            st = held.get(topic)
            out[topic] = st.resume_point() if st is not None else None
        return out

    # -- connecting --------------------------------------------------------------

    async def connect(self) -> Message:
        """Open the connection and return the ``welcome``.

        A refusal (HTTP 401 before the upgrade, a close such as 4401 after it)
        raises ClientClosed, and ends the client when terminal; a network
        failure raises as it is, and connect() may be called again. With
        several regions each is tried once, in order, until one welcomes
        the client; what the last one raised is raised when none does (a
        terminal refusal stops at once: the token is the same everywhere).
        Reconnecting only starts once a first connection has been welcomed.
        """
        if self._lifecycle is not None or self.closed.is_set():
            raise RuntimeError("connect() on a client already connected or closed")
        for tried in itertools.count(1):
            try:
                ws, welcome = await self._open()
            except ClientClosed as exc:
                if exc.info.terminal:
                    self._finish(exc.info)
                    raise
                if self._failed_attempt(exc) or tried >= len(self.urls):
                    raise
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                if self._failed_attempt(exc) or tried >= len(self.urls):
                    raise
            else:
                break
        self._lifecycle = asyncio.create_task(self._run(ws), name=f"oddsclient:{self.name}")
        return welcome

    async def _open(self) -> tuple[ClientConnection, Message]:
        """Connect to the ring's current region and wait for its ``welcome``."""
        index = self.regions.index
        url, headers = connection_target(self.regions.urls[index], self.token, self.token_in)
        try:
            ws = await connect(url, additional_headers=headers, **self.ws_options)
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise ClientClosed(CloseInfo(None, f"HTTP {status}", status)) from exc
        try:
            raw = await asyncio.wait_for(ws.recv(decode=False), self.ws_options["open_timeout"])
            msg = orjson.loads(raw)
        except ConnectionClosed as exc:
            raise ClientClosed(close_info(exc)) from exc
        except BaseException:
            await ws.close()
            raise
        if not isinstance(msg, dict) or msg.get("type") != "welcome":
            await ws.close(1002, "expected welcome")
            raise ClientClosed(CloseInfo(1002, f"first frame was not welcome: {msg!r:.200}"))
        self.regions.connected()
        if self._region_index is not None and index != self._region_index:
            self.stats.failovers += 1
            log.info("%s: failed over to region %s (%s)", self.name, msg.get("region"),
                     self.regions.urls[index])
        self._region_index = index
        self.welcome = msg
        self.checker.feed(msg)
        self._ws = ws
        self._after_ms = None
        self._leave_region = False
        self.connected.set()
        return ws, msg

    def _failed_attempt(self, exc: BaseException) -> bool:
        """Count an attempt that got no welcome and move the ring on; True
        when every region has now failed in a row (back off before the next)."""
        self.stats.connect_failures += 1
        log.debug("%s: %s failed: %r", self.name, self.regions.current, exc)
        return self.regions.failed()

    async def _run(self, ws: ClientConnection) -> None:
        """Read; on a drop, wait, reconnect and resume; until terminal or closed.

        After a drop the first attempt goes to the same region (after the
        ``reconnect`` frame's ``after_ms``, or a backoff), unless the frame
        said ``region_drain``: then to the next region. From there, each
        failed attempt moves to the next region at once, and a full pass of
        failures backs off (`RegionRing`).
        """
        attempt = 0
        try:
            while True:
                opened = time.monotonic()
                info = await self._read(ws)
                self._disconnected(info)
                if self._closing:
                    self._finish(CloseInfo(1000, "closed by client"))
                    return
                if info.terminal or not self.reconnect:
                    self._finish(info)
                    return
                if time.monotonic() - opened > BACKOFF_CAP_S:
                    attempt = 0  # it had been up a while: not a flapping server
                log.debug("%s: disconnected (%s %s), reconnecting", self.name, info.code,
                         info.reason)
                if self._leave_region:
                    self.regions.leave()
                delay = (
                    self._after_ms / 1000 if self._after_ms is not None
                    else backoff_delay(attempt)
                )
                while True:  # one pass round the regions per iteration
                    attempt += 1
                    if await self._sleep_unless_closing(delay):
                        self._finish(CloseInfo(1000, "closed by client"))
                        return
                    opened_ws = await self._open_pass()
                    if opened_ws is not None:
                        ws = opened_ws
                        break
                    self.stats.backoffs += 1
                    delay = backoff_delay(attempt)
                if self._closing:  # close() came while the connection opened
                    await ws.close()
                    self._finish(CloseInfo(1000, "closed by client"))
                    return
                self.stats.reconnects += 1
                self._resubscribe()
        except _Terminal as exc:
            self._finish(exc.info)
        except asyncio.CancelledError:
            self._finish(CloseInfo(1000, "closed by client"))
            raise
        except Exception as exc:
            # A bug (ours, or an on_message callback's): stop loudly, once.
            log.exception("%s: reader failed", self.name)
            if self._ws is not None:
                await self._ws.close(1000)
            self._finish(CloseInfo(None, f"client error: {exc!r}"))

    async def _open_pass(self) -> ClientConnection | None:
        """Attempts from the ring's current region on, each failure moving to
        the next at once, until one is welcomed (returned) or every region
        has failed in a row (None: back off). Raises _Terminal on a refusal
        that retrying cannot help."""
        while not self._closing:
            try:
                ws, _ = await self._open()
            except ClientClosed as exc:
                if exc.info.terminal:
                    raise _Terminal(exc.info) from exc
                if self._failed_attempt(exc):
                    return None
            except (OSError, TimeoutError, ValueError, InvalidHandshake) as exc:
                if self._failed_attempt(exc):
                    return None
            else:
                return ws
        return None

    async def _read(self, ws: ClientConnection) -> CloseInfo:
        handle = self._handle_frame
        try:
            while True:
                handle(await ws.recv(decode=False))
        except ConnectionClosed as exc:
            return close_info(exc)

    async def _sleep_unless_closing(self, delay: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)
        return self._closing

    def _disconnected(self, info: CloseInfo) -> None:
        self._ws = None
        self.connected.clear()
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(Disconnected(f"{info.code} {info.reason}"))

    def _finish(self, info: CloseInfo) -> None:
        if self.closed.is_set():
            return
        self.closed_reason = info
        self._ws = None
        self.connected.clear()
        self.closed.set()
        self._stop.set()
        error = ClientClosed(info)
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(error)
        self._pending.clear()
        for _, fut in (*self._sync_waiters, *self._resume_waiters):
            if not fut.done():
                fut.set_exception(error)
        self._sync_waiters.clear()
        self._resume_waiters.clear()
        for task in self._side_tasks:
            task.cancel()
        if not self._closing:
            log.info("%s: closed for good: %s", self.name, info)

    async def close(self) -> None:
        """Close with 1000 and stop reconnecting."""
        self._closing = True
        self._stop.set()
        ws = self._ws
        if ws is not None:
            await ws.close()
        task = self._lifecycle
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), 5)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._finish(CloseInfo(1000, "closed by client"))

    async def __aenter__(self) -> OddsClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- reading -------------------------------------------------------------------

    def _handle_frame(self, raw: bytes) -> None:
        self.stats.frames += 1
        try:
            msg = orjson.loads(raw)
            kind = msg.get("type")
        except (orjson.JSONDecodeError, AttributeError):
            self.stats.errors += 1
            self.errors.append({"type": "client_error", "code": "undecodable_frame",
                                "message": repr(raw[:200])})
            return
        if kind == "odds" or kind == "stats":
            self._on_event(msg)
        elif kind == "batch":
            self.stats.batches += 1
            on_event = self._on_event
            for event in msg.get("events") or ():
                on_event(event)
        else:
            self._on_control(kind, msg)

    def _on_event(self, event: Message) -> None:
        self.stats.events += 1
        self.checker.feed_event(event)
        if event.get("coalesced"):
            self.stats.coalesced += 1
        if self.record_latency:
            ts = event.get("ts")
            if ts is not None:
                self.latencies_ns.append(time.time_ns() - ts)
        if self.on_message is not None:
            self.on_message(event)

    def _on_control(self, kind: str | None, msg: Message) -> None:
        self.checker.feed(msg)
        if kind == "snapshot":
            self.stats.snapshots += 1
            self._notify_synced()
        elif kind == "reset":
            self.stats.resets += 1
        elif kind == "subscribed":
            topics = list(msg.get("topics") or ())
            self.subscriptions.update(topics)
            p = self._pending.pop(msg.get("id"), None)  # type: ignore[arg-type]
            if p is not None and not p.future.done():
                p.future.set_result(SubscribeResult(topics, p.errors))
            self._notify_synced()
        elif kind == "unsubscribed":
            self.subscriptions.difference_update(msg.get("topics") or ())
            self._resolve(msg, None)
        elif kind == "pong":
            self._resolve(msg, msg.get("ts"))
        elif kind == "error":
            self._on_error(msg)
        elif kind == "reconnect":
            after_ms = msg.get("after_ms")
            if isinstance(after_ms, int) and after_ms >= 0:
                self._after_ms = after_ms
            self._leave_region = moves_region(msg.get("reason"))
        elif kind == "welcome":
            self.welcome = msg
        if self.on_message is not None:
            self.on_message(msg)

    def _resolve(self, msg: Message, value: Any) -> None:
        p = self._pending.pop(msg.get("id"), None)  # type: ignore[arg-type]
        if p is not None and not p.future.done():
            p.future.set_result(value)

    def _on_error(self, msg: Message) -> None:
        self.stats.errors += 1
        p = self._pending.get(msg.get("id"))  # type: ignore[arg-type]
        if p is None:
            self.errors.append(msg)
            return
        if p.op == "subscribe" and msg.get("topics"):
            # A per-topic refusal; the `subscribed` for the rest follows (§3).
            p.errors.append(msg)
            return
        del self._pending[msg["id"]]
        if not p.future.done():
            p.future.set_exception(RequestError(msg))

    def _notify_synced(self) -> None:
        if not self._sync_waiters:
            return
        synced = self.checker.synced
        still = []
        for missing, fut in self._sync_waiters:
            missing.difference_update([t for t in missing if synced(t)])
            if fut.done():
                continue
            if missing:
                still.append((missing, fut))
            else:
                fut.set_result(None)
        self._sync_waiters = still

    # -- requests ------------------------------------------------------------------

    async def _send(self, obj: Message) -> None:
        ws = self._ws
        if ws is None:
            if self.closed.is_set():
                raise ClientClosed(self.closed_reason or CloseInfo(None))
            raise Disconnected("not connected")
        try:
            await ws.send(orjson.dumps(obj), text=True)
        except ConnectionClosed as exc:
            raise Disconnected(str(exc)) from exc

    async def _request(self, op: str, fields: Message, timeout: float) -> Any:
        """Send `op` with a fresh id and wait for the reply that repeats it."""
        if not self.connected.is_set():
            if self.closed.is_set():
                raise ClientClosed(self.closed_reason or CloseInfo(None))
            await asyncio.wait_for(self.connected.wait(), timeout)
        request_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _Pending(op, fut)
        try:
            await self._send({"op": op, "id": request_id, **fields})
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(request_id, None)

    async def subscribe(
        self,
        topics: Iterable[str] | Mapping[str, ResumePoint | None],
        timeout: float = 10.0,
    ) -> SubscribeResult:
        """Subscribe; refusals come back in `errors`, not as exceptions (§3).

        A mapping is sent as given: topic -> resume point or None. A plain list
        resumes each topic from what the client holds (None when nothing), and
        leaves out topics already subscribed on this connection, which count
        as accepted: subscribing twice must not restart a stream.
        """
        if isinstance(topics, Mapping):
            request = {t: (dict(p) if p is not None else None) for t, p in topics.items()}
            already: list[str] = []
        else:
            wanted = list(dict.fromkeys(topics))
            held = self.checker.topics
            already = [t for t in wanted if t in held and held[t].live]
            request = self.resume_points([t for t in wanted if t not in already])
        if not request:
            return SubscribeResult(already, [])
        for topic, point in request.items():
            if point is None:
                self.checker.expect_snapshot(topic)
            else:
                self.checker.expect_resume(topic, point["epoch"], point["seq"])
        result: SubscribeResult = await self._request("subscribe", {"topics": request}, timeout)
        if already:
            result.accepted = already + result.accepted
        return result

    async def unsubscribe(self, topics: Iterable[str], timeout: float = 10.0) -> None:
        """Stop following `topics`; what was held for them is dropped."""
        topics = list(dict.fromkeys(topics))
        self.subscriptions.difference_update(topics)  # no resume of them meanwhile
        await self._request("unsubscribe", {"topics": topics}, timeout)

    async def ping(self, timeout: float = 10.0) -> int:
        """Round-trip to the server; returns its clock (``pong.ts``)."""
        return await self._request("ping", {}, timeout)

    async def ack(self, topics: Mapping[str, int] | None = None) -> bool:
        """Tell the server what was processed (default: the last seq of each
        synced topic). No reply comes; a refusal lands in `errors`. Returns
        False when there was nothing to ack or no connection to ack on.
        """
        if topics is None:
            held = self.checker.topics
            topics = {
                t: held[t].seq for t in self.subscriptions if t in held and held[t].synced
            }
        if not topics or self._ws is None:
            return False
        try:
            await self._send({"op": "ack", "id": next(self._ids), "topics": dict(topics)})
        except Disconnected:
            return False
        return True

    # -- waiting ---------------------------------------------------------------------

    async def wait_synced(self, topics: Iterable[str], timeout: float = 10.0) -> None:
        """Wait until each topic has a base on this connection: its snapshot,
        or the ``subscribed`` that starts its replay. Raises TimeoutError
        naming the topics still missing.
        """
        synced = self.checker.synced
        missing = {t for t in topics if not synced(t)}
        if not missing:
            return
        if self.closed.is_set():
            raise ClientClosed(self.closed_reason or CloseInfo(None))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (missing, fut)
        self._sync_waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TimeoutError(f"not synced after {timeout}s: {sorted(missing)}") from None
        finally:
            with contextlib.suppress(ValueError):
                self._sync_waiters.remove(entry)

    async def wait_resumed(self, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until `count` reconnects in all have been resumed: reconnected
        and the re-subscribe answered (the replays may still be arriving;
        follow with `wait_synced` for the bases).
        """
        if self.stats.resumes >= count:
            return
        if self.closed.is_set():
            raise ClientClosed(self.closed_reason or CloseInfo(None))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (count, fut)
        self._resume_waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            with contextlib.suppress(ValueError):
                self._resume_waiters.remove(entry)

    def _mark_resumed(self) -> None:
        self.stats.resumes += 1
        n = self.stats.resumes
        for count, fut in self._resume_waiters:
            if count <= n and not fut.done():
                fut.set_result(None)

    # -- resuming ----------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def _resubscribe(self) -> None:
        if not self.subscriptions:
            self._mark_resumed()
            return
        self._spawn(self._resume(list(self.subscriptions)))

    async def _resume(self, topics: list[str]) -> None:
        """Re-subscribe after a reconnect, each topic from its held point (§4)."""
        try:
            result = await self.subscribe(self.resume_points(topics), timeout=30.0)
        except (Disconnected, TimeoutError, RequestError) as exc:
            # The next reconnect resumes again; a refused whole request (rate
            # limited) is retried after a backoff on this connection.
            log.info("%s: resume failed: %r", self.name, exc)
            if isinstance(exc, RequestError):
                self.errors.append(exc.error)
                self._spawn(self._retry_later(topics, exc.error))
            return
        self._handle_resume_refusals(result)
        self._mark_resumed()

    def _handle_resume_refusals(self, result: SubscribeResult) -> None:
        for error in result.errors:
            topics = list(error.get("topics") or ())
            self.errors.append(error)
            if error.get("code") == SHED:
                # §5: a node sheds new subscriptions; ours count as new there.
                self._spawn(self._retry_later(topics, error))
            else:
                self.subscriptions.difference_update(topics)
                for topic in topics:
                    self.checker.topics.pop(topic, None)

    async def _retry_later(self, topics: list[str], error: Message) -> None:
        after_ms = error.get("retry_after_ms")
        attempt = 0
        while True:
            delay = after_ms / 1000 if isinstance(after_ms, int) else backoff_delay(attempt + 3)
            if await self._sleep_unless_closing(delay):
                return
            if not self.connected.is_set():
                return  # the reconnect's resume covers them
            wanted = [t for t in topics if t in self.subscriptions]
            if not wanted:
                return
            try:
                result = await self.subscribe(self.resume_points(wanted), timeout=30.0)
            except RequestError as exc:
                after_ms = exc.error.get("retry_after_ms")
                attempt += 1
                continue
            except (Disconnected, TimeoutError):
                return
            shed = [e for e in result.errors if e.get("code") == SHED]
            self._handle_resume_refusals(
                SubscribeResult(result.accepted, [e for e in result.errors if e not in shed])
            )
            if not shed:
                return
            topics = [t for e in shed for t in e.get("topics") or ()]
            after_ms = shed[0].get("retry_after_ms")
            attempt += 1
