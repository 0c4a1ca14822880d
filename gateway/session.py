"""One player connection's state: its topics, its outbox, its limits.

Plain objects that never await. The hub hands a session events already in
order for their topic; the session's own cursor per topic drops what the
player already holds (a resume ahead of this worker) and keeps events aside
while a replay read is in flight. Delivered events wait in `pending` until
the end of the loop turn, then leave as one frame: the event itself when it
is alone, a `batch` when several arrived together. The bytes of an event are
the ones Redis published; nothing is encoded per player.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from gateway import protocol
from gateway.errors import CloseCode, ErrorCode, ProtocolError
from gateway.sequencer import SeqCursor, Verdict


class FlushScheduler:
    """Flushes every session that got events, once, at the end of the loop turn."""

    def __init__(self) -> None:
        self._dirty: list[Session] = []
        self._scheduled = False

    def schedule(self, session: Session) -> None:
        self._dirty.append(session)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.run)

    def run(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        for session in dirty:
            session.flush()


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
    def __init__(
        self,
        conn_id: str,
        *,
        player: str,
        write: Callable[[bytes], None],
        scheduler: FlushScheduler,
        topic_prefixes: tuple[str, ...] | None = None,
        max_topics: int = 200,
        rate: float = 20.0,
        burst: float = 40.0,
        max_refused_in_a_row: int = 20,
        max_bad_requests: int = 10,
        max_batch: int = 256,
    ) -> None:
        self.conn_id = conn_id
        self.player = player
        self._write = write
        self._scheduler = scheduler
        self.topic_prefixes = topic_prefixes  # None: every topic
        self.max_topics = max_topics
        self.max_batch = max_batch
        self.cursors: dict[str, SeqCursor[bytes]] = {}
        self.acked: dict[str, int] = {}
        self.pending: list[bytes] = []
        self.open = True
        self._limiter = RateLimiter(rate, burst)
        self._refused_in_a_row = 0
        self._max_refused = max_refused_in_a_row
        self._bad_requests = 0
        self._max_bad = max_bad_requests
        self.frames_out = 0
        self.bytes_out = 0
        self.events_out = 0

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
        """Whether the token's `topics` prefixes cover `topic`, matched by whole ids.

        `odds:1:39` covers `odds:1:39` and `odds:1:39:7`, never `odds:1:390`.
        """
        prefixes = self.topic_prefixes
        if prefixes is None:
            return True
        return any(topic == p or topic.startswith(p if p.endswith(":") else p + ":")
                   for p in prefixes)

    def ack(self, topics: dict[str, int]) -> None:
        """Remember what the player says it processed; topics it left are ignored."""
        for topic, seq in topics.items():
            if topic in self.cursors:
                self.acked[topic] = seq

    # -- delivery ---------------------------------------------------------

    def deliver(self, topic: str, epoch: str, seq: int, event: bytes) -> Verdict:
        """Offer an in-order event of a topic this session follows."""
        cursor = self.cursors.get(topic)
        if cursor is None:
            return Verdict.STALE
        verdict = cursor.offer(epoch, seq, event)
        if verdict is Verdict.DELIVER:
            if not self.pending:
                self._scheduler.schedule(self)
            self.pending.append(event)
        return verdict

    def enqueue(self, events: list[bytes]) -> None:
        """Events already checked against the cursor (a replay, a merge)."""
        if not events:
            return
        if not self.pending:
            self._scheduler.schedule(self)
        self.pending.extend(events)

    def flush(self) -> None:
        pending = self.pending
        if not pending:
            return
        self.pending = []
        self.events_out += len(pending)
        if len(pending) == 1:
            self._emit(pending[0])
            return
        step = self.max_batch
        for i in range(0, len(pending), step):
            chunk = pending[i : i + step]
            self._emit(chunk[0] if len(chunk) == 1 else protocol.batch(chunk))

    def send(self, payload: bytes) -> None:
        """A control frame; events already pending go first, to keep order."""
        if self.pending:
            self.flush()
        self._emit(payload)

    def _emit(self, payload: bytes) -> None:
        if not self.open:
            return
        self.frames_out += 1
        self.bytes_out += len(payload)
        self._write(payload)
