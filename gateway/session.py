"""One player connection's state: its topics, its outbox, its limits.

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
from collections.abc import Callable
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


class Session:
    __slots__ = (
        "__weakref__",
        "_bad_requests",
        "_limiter",
        "_max_bad",
        "_max_refused",
        "_refused_in_a_row",
        "_scheduler",
        "_write",
        "_write_frame",
        "acked",
        "bytes_out",
        "coalescing",
        "conn_id",
        "counters",
        "cursors",
        "events_out",
        "expires_at",
        "frames_out",
        "last_ping_at",
        "max_batch",
        "max_topics",
        "on_pressure",
        "open",
        "outbox",
        "pending",
        "ping_sent_at",
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
        max_topics: int = 200,
        rate: float = 20.0,
        burst: float = 40.0,
        max_refused_in_a_row: int = 20,
        max_bad_requests: int = 10,
        max_batch: int = 256,
        counters: WorkerCounters | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.player = player
        self._write = write  # payload -> one WebSocket frame on the wire
        self._write_frame = write_frame  # an already framed payload, written as is
        self._scheduler = scheduler
        self.scheduled = False  # in the scheduler's list for this turn
        self.topic_prefixes = topic_prefixes  # None: every topic
        self.max_topics = max_topics
        self.max_batch = max_batch
        self.cursors: dict[str, SeqCursor[bytes]] = {}
        self.acked: dict[str, int] | None = None  # made at the first ack
        self.pending: list[bytes] = []  # slow path: events checked by this session's cursors
        self.turn: list[Chunk] | None = None  # fast path: one topic's shared frames this turn
        self.turn_source: list[bytes] | None = None  # the events inside `turn`
        self.turn_events: list[bytes] | None = None  # fast path, several topics this turn
        self.open = True
        # Back-pressure (PROTOCOL.md §5): set while the transport is over its
        # high-water mark; events then go to `outbox`, newest per market only.
        self.pressured_since: float | None = None
        # Set by the hub from the moment it moves the session to its outbox until
        # the outbox is drained: not the transport's flag, which may flip back
        # before the hub acts, and events must not overtake what the outbox holds.
        self.coalescing = False
        # Heartbeat and token expiry, kept by the worker (gateway/server.py).
        self.ping_sent_at: float | None = None  # a ping awaiting its pong
        self.last_ping_at: float | None = None
        self.expires_at: float | None = None  # the token's exp plus leeway, Unix seconds
        self.outbox: CoalescingOutbox | None = None  # made when needed (gateway/hub.py)
        self.on_pressure: Callable[[Session], None] | None = None  # the hub's hook
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
        return topic_granted(self.topic_prefixes, topic)

    def ack(self, topics: dict[str, int]) -> None:
        """Remember what the player says it processed; topics it left are ignored."""
        for topic, seq in topics.items():
            if topic in self.cursors:
                if self.acked is None:
                    self.acked = {}
                self.acked[topic] = seq

    # -- delivery ---------------------------------------------------------

    def deliver(self, topic: str, epoch: str, seq: int, event: bytes,
                market: str | None = None) -> Verdict:
        """Slow path: offer an in-order event of a topic to this session's cursor."""
        cursor = self.cursors.get(topic)
        if cursor is None:
            return Verdict.STALE
        verdict = cursor.offer(epoch, seq, event)
        if verdict is Verdict.DELIVER:
            if self.coalescing and market is not None and self.outbox is not None:
                self.outbox.push(topic, market, seq, event)
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
            if self.on_pressure is not None:
                self.on_pressure(self)

    def on_resume(self) -> None:
        """The transport drained under its low-water mark."""
        if self.pressured_since is not None:
            self.pressured_since = None
            if self.on_pressure is not None:
                self.on_pressure(self)

    @property
    def pressured(self) -> bool:
        return self.pressured_since is not None

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
