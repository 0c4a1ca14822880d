"""One player connection's state: its topics, its outbox, its limits.

The session owns all of it. Its delivery state is one `Delivery` value,
changed only by the methods that guard each move (`start_coalescing`,
`stop_coalescing`, `close`); its heartbeat and token expiry are decided by
`heartbeat` and `token_expired`; the fan-out hands it a turn's frames with
`add_turn`. Other modules call these methods and read; they never assign.

Plain objects that never await. Events reach a session two ways (see
gateway/fanout.py): on the fast path, a topic's events of one loop turn
arrive as frames built once for every player in line with the topic's
stream (`turn`); on the slow path, a player catching up (replay in flight,
resume ahead of this worker) gets events one by one through its own cursor
per topic, which drops what it already holds and keeps events aside while a
read is in flight (`pending`). At the end of the turn everything leaves:
the shared frames as they are, the rest as one frame per `max_batch`
events. The bytes of an event are the ones Redis published; nothing is
encoded per player.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import Protocol

from gateway import protocol
from gateway.auth import topic_granted
from gateway.coalesce import CoalescingOutbox
from gateway.counters import WorkerCounters
from gateway.errors import CloseCode, ErrorCode, ProtocolError
from gateway.sequencer import SeqCursor, Verdict

# (payload, the payload framed for the wire, how many events it carries)
Chunk = tuple[bytes, bytes, int]


class Scheduler(Protocol):
    def schedule(self, session: Session) -> None: ...


class RateLimiter:
    """A token bucket: `rate` requests a second, bursts up to `burst`."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last: float | None = None

    def allow(self, now: float) -> bool:
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Delivery(IntEnum):
    """How a session's events leave it (PROTOCOL.md §5)."""

    LIVE = 0  # as they come: the shared frames, or its own cursors' events
    COALESCING = 1  # over its high-water mark: the newest event per market waits
    CLOSED = 2  # nothing more is written


class Beat(IntEnum):
    """What the heartbeat does for a session on its turn."""

    NOTHING = 0
    PING = 1  # send a ping now (its data: gateway/liveness.py heartbeat_payload)
    DEAD = 2  # a whole interval without the pong of our ping: close it


class SessionStateError(RuntimeError):
    """A move its state does not allow: a bug in the caller, never the player's doing."""


class Session:
    __slots__ = (
        "__weakref__",
        "_bad_requests",
        "_expires_at",
        "_last_ping_at",
        "_limiter",
        "_max_bad",
        "_max_refused",
        "_on_pressure",
        "_outbox",
        "_ping_sent_at",
        "_refused_in_a_row",
        "_scheduler",
        "_write",
        "_write_frame",
        "acked",
        "bytes_out",
        "conn_id",
        "counters",
        "cursors",
        "delivery",
        "events_out",
        "frames_out",
        "max_batch",
        "max_topics",
        "open",
        "partner",
        "pending",
        "player",
        "pressured_since",
        "scheduled",
        "topic_prefixes",
        "turn",
        "turn_events",
        "turn_source",
    )

    def __init__(
        self,
        conn_id: str,
        *,
        player: str,
        write: Callable[[bytes], None],
        scheduler: Scheduler,
        write_frame: Callable[[bytes], None] | None = None,
        topic_prefixes: tuple[str, ...] | None = None,
        partner: str | None = None,
        max_topics: int = 200,
        rate: float = 20.0,
        burst: float = 40.0,
        max_refused_in_a_row: int = 20,
        max_bad_requests: int = 10,
        max_batch: int = 256,
        counters: WorkerCounters | None = None,
        on_pressure: Callable[[Session], None] | None = None,
        expires_at: float | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.player = player
        self._write = write  # payload -> one WebSocket frame on the wire
        self._write_frame = write_frame  # an already framed payload, written as is
        self._scheduler = scheduler
        self.scheduled = False  # in the scheduler's list for this turn
        self.topic_prefixes = topic_prefixes  # None: every odds topic
        self.partner = partner  # a partner's statistics session (PROTOCOL.md §12)
        self.max_topics = max_topics
        self.max_batch = max_batch
        self.cursors: dict[str, SeqCursor[bytes]] = {}
        self.acked: dict[str, int] | None = None  # made at the first ack
        self.pending: list[bytes] = []  # slow path: events checked by this session's cursors
        self.turn: list[Chunk] | None = None  # fast path: one topic's shared frames this turn
        self.turn_source: list[bytes] | None = None  # the events inside `turn`
        self.turn_events: list[bytes] | None = None  # fast path, several topics this turn
        # COALESCING from the moment the hub moves the session to its outbox
        # until the outbox is drained: not the transport's flag, which may flip
        # back before the hub acts, and events must not overtake the outbox.
        self.delivery = Delivery.LIVE
        # delivery is not CLOSED, kept as a plain attribute for the hot path (a
        # property costs every frame written); only `close` changes it.
        self.open = True
        # Back-pressure (PROTOCOL.md §5): set while the transport is over its
        # high-water mark (the transport's flag, reported by on_pause/on_resume).
        self.pressured_since: float | None = None
        self._outbox: CoalescingOutbox | None = None  # only while COALESCING
        self._on_pressure = on_pressure  # the hub runner's hook
        # Heartbeat and token expiry (decided here, acted on by gateway/server.py).
        self._ping_sent_at: float | None = None  # a ping awaiting its pong
        self._last_ping_at: float | None = None
        self._expires_at = expires_at  # the token's exp plus leeway, Unix seconds
        self._limiter = RateLimiter(rate, burst)
        self._refused_in_a_row = 0
        self._max_refused = max_refused_in_a_row
        self._bad_requests = 0
        self._max_bad = max_bad_requests
        self.frames_out = 0
        self.bytes_out = 0
        self.events_out = 0
        self.counters = counters or WorkerCounters()  # the worker's totals

    # -- requests ---------------------------------------------------------

    def admit(self, now: float) -> None:
        """Charge one request to the rate limit; refuse it, or close, when over."""
        if self._limiter.allow(now):
            self._refused_in_a_row = 0
            return
        self._refused_in_a_row += 1
        close = CloseCode.RATE_LIMITED if self._refused_in_a_row >= self._max_refused else None
        raise ProtocolError(
            ErrorCode.RATE_LIMITED,
            "too many requests; slow down",
            retry_after_ms=max(1, math.ceil(1000 / self._limiter.rate)),
            close_code=close,
        )

    def count_bad_request(self, exc: ProtocolError) -> ProtocolError:
        """A bad request; the one that makes too many also closes the connection."""
        self._bad_requests += 1
        if self._bad_requests >= self._max_bad and exc.close_code is None:
            exc.close_code = CloseCode.REPEATED_BAD_REQUESTS
        return exc

    def allowed(self, topic: str) -> bool:
        """Whether the token's grants cover `topic` (gateway.auth.topic_granted)."""
        return topic_granted(self.topic_prefixes, topic, self.partner)

    def ack(self, topics: dict[str, int]) -> None:
        """Remember what the player says it processed; topics it left are ignored."""
        for topic, seq in topics.items():
            if topic in self.cursors:
                if self.acked is None:
                    self.acked = {}
                self.acked[topic] = seq

    # -- state ----------------------------------------------------------------

    @property
    def coalescing(self) -> bool:
        return self.delivery is Delivery.COALESCING

    @property
    def outbox(self) -> CoalescingOutbox | None:
        """The newest pending event per market, while coalescing (else None)."""
        return self._outbox

    def close(self) -> None:
        """Nothing more is written to this player (closing, drained, cut off)."""
        self.delivery = Delivery.CLOSED
        self.open = False
        self._outbox = None

    def start_coalescing(self) -> CoalescingOutbox:
        """LIVE -> COALESCING: events wait in the outbox, newest per market."""
        if self.delivery is not Delivery.LIVE:
            raise SessionStateError(f"{self.conn_id}: start coalescing from {self.delivery.name}")
        self.delivery = Delivery.COALESCING
        self._outbox = CoalescingOutbox()
        return self._outbox

    def stop_coalescing(self) -> CoalescingOutbox:
        """COALESCING -> LIVE: the outbox is handed back to be sent (its memory goes)."""
        if self.delivery is not Delivery.COALESCING or self._outbox is None:
            raise SessionStateError(f"{self.conn_id}: stop coalescing from {self.delivery.name}")
        outbox, self._outbox = self._outbox, None
        self.delivery = Delivery.LIVE
        return outbox

    # -- liveness ---------------------------------------------------------------

    @property
    def ping_sent_at(self) -> float | None:
        """When the ping now awaiting its pong left (None: none awaits)."""
        return self._ping_sent_at

    def heartbeat(self, now: float, interval: float) -> Beat:
        """This session's turn of the heartbeat: a ping every `interval`, and a
        peer whose pong does not come within the next one is dead."""
        sent = self._ping_sent_at
        if sent is not None:
            return Beat.DEAD if now - sent > interval else Beat.NOTHING
        last = self._last_ping_at
        if last is None:
            self._last_ping_at = now
        elif now - last >= interval:
            self._last_ping_at = self._ping_sent_at = now
            return Beat.PING
        return Beat.NOTHING

    def pong(self) -> None:
        """The pong of our ping came: the peer reads."""
        self._ping_sent_at = None

    def token_expired(self, wall: float) -> bool:
        """True once, when the token's expiry (plus leeway) has passed."""
        if self._expires_at is not None and wall >= self._expires_at:
            self._expires_at = None
            return True
        return False

    # -- delivery ---------------------------------------------------------

    def deliver(self, topic: str, epoch: str, seq: int, event: bytes,
                market: str | None = None) -> Verdict:
        """Slow path: offer an in-order event of a topic to this session's cursor."""
        cursor = self.cursors.get(topic)
        if cursor is None:
            return Verdict.STALE
        verdict = cursor.offer(epoch, seq, event)
        if verdict is Verdict.DELIVER:
            if self._outbox is not None and market is not None:  # COALESCING
                self._outbox.push(topic, market, seq, event)
                return verdict
            if not self.scheduled:
                self.scheduled = True
                self._scheduler.schedule(self)
            self.pending.append(event)
        return verdict

    # -- back-pressure (called by the connection's flow control) ------------

    def on_pause(self, now: float) -> None:
        """The transport passed its high-water mark."""
        if self.pressured_since is None:
            self.pressured_since = now
            if self._on_pressure is not None:
                self._on_pressure(self)

    def on_resume(self) -> None:
        """The transport drained under its low-water mark."""
        if self.pressured_since is not None:
            self.pressured_since = None
            if self._on_pressure is not None:
                self._on_pressure(self)

    @property
    def pressured(self) -> bool:
        return self.pressured_since is not None

    @staticmethod
    def add_turn(sessions: Iterable[Session], chunks: list[Chunk], events: list[bytes],
                 to_flush: list[Session]) -> None:
        """The fast path: a topic's frames of this turn, shared by every player in line
        with it; the sessions not yet listed for this turn's flush join `to_flush`.

        One call for all of a channel's players rather than one each: this is the
        loop every delivery goes through.
        """
        for session in sessions:
            if session.turn is None and session.turn_events is None:
                session.turn = chunks
                session.turn_source = events
            elif session.turn is not None:  # a second topic this turn: one batch of both
                session.turn_events = session.turn_source + events  # type: ignore[operator]
                session.turn = session.turn_source = None
            else:
                session.turn_events.extend(events)  # type: ignore[union-attr]
            if not session.scheduled:
                session.scheduled = True
                to_flush.append(session)

    @property
    def has_output(self) -> bool:
        return bool(self.pending) or self.turn is not None or self.turn_events is not None

    def flush(self) -> None:
        """Write what this turn gave the session: shared frames first, then the rest."""
        self.scheduled = False
        turn, self.turn = self.turn, None
        if turn is not None:
            self.turn_source = None
            write_frame = self._write_frame
            for payload, frame, count in turn:
                self.events_out += count
                if write_frame is None:
                    self._emit(payload)
                elif self.open:
                    self.frames_out += 1
                    self.bytes_out += len(payload)
                    totals = self.counters
                    totals.frames_out += 1
                    totals.bytes_out += len(payload)
                    write_frame(frame)
        events = self.pending
        if self.turn_events is not None:
            events = events + self.turn_events if events else self.turn_events
            self.turn_events = None
        if not events:
            return
        self.pending = []
        self.events_out += len(events)
        if len(events) == 1:
            self._emit(events[0])
            return
        step = self.max_batch
        for i in range(0, len(events), step):
            chunk = events[i : i + step]
            self._emit(chunk[0] if len(chunk) == 1 else protocol.batch(chunk))

    def send(self, payload: bytes) -> None:
        """A control frame; events already pending go first, to keep order."""
        if self.has_output:
            self.flush()
        self._emit(payload)

    def _emit(self, payload: bytes) -> None:
        if not self.open:
            return
        self.frames_out += 1
        self.bytes_out += len(payload)
        totals = self.counters
        totals.frames_out += 1
        totals.bytes_out += len(payload)
        self._write(payload)
