"""One topic inside one worker: its position, its state, who follows it.

The channel is the worker's copy of the topic as of its cursor's seq: the
newest event of every market (so a snapshot needs no Redis read and cannot
race the live stream: it is built in the same loop turn that attaches the
player) and a ring of the most recent events (so a player who reconnects a
few seconds behind is replayed from memory, which is what a drained worker's
crowd does all at once).

It also owns who follows it, in two groups: players in line with its stream
(`aligned`, who share the turn's frames) and players catching up through
their own cursors (`tracking`). Every move between them, in or out, first
hands the turn's events to the aligned players (`flush`): a player never
gets an event from before its snapshot, nor misses one from before it left.
That rule lives here, in `align`, `track` and `remove`, and nowhere else.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import TYPE_CHECKING

from gateway import protocol
from gateway.sequencer import SeqCursor

if TYPE_CHECKING:
    from gateway.session import Session

# (market, event JSON): what the channel's cursor holds while it syncs
Item = tuple[str, bytes]


class TopicChannel:
    __slots__ = (
        "_flush",
        "aligned",
        "cursor",
        "joining",
        "latest_by_market",
        "ready",
        "recent",
        "repairing",
        "topic",
        "tracking",
        "turn",
    )

    def __init__(self, topic: str, recent_capacity: int,
                 flush: Callable[[TopicChannel], None] = lambda channel: None) -> None:
        self.topic = topic
        self.cursor: SeqCursor[Item] = SeqCursor(syncing=True)  # live once loaded
        self.latest_by_market: dict[str, bytes] = {}
        self.recent: deque[bytes] = deque(maxlen=recent_capacity)  # contiguous, ends at seq
        # Followers in line with the cursor: they get the turn's shared frames.
        self.aligned: set[Session] = set()
        # Followers catching up through their own cursors (slow path).
        self.tracking: set[Session] = set()
        self.turn: list[bytes] = []  # delivered this loop turn, not yet fanned out
        self._flush = flush  # hands `turn` to the aligned players (Fanout.flush_channel)
        self.joining = 0  # joins waiting for the load; the channel stays while > 0
        self.ready = False  # loaded: it has a position and a state
        self.repairing = False  # a gap fill or resync is in flight

    @property
    def subscribers(self) -> set[Session]:
        return self.aligned | self.tracking

    @property
    def followed(self) -> bool:
        return bool(self.aligned or self.tracking)

    @property
    def epoch(self) -> str:
        assert self.cursor.epoch is not None
        return self.cursor.epoch

    @property
    def seq(self) -> int:
        return self.cursor.seq

    # -- the turn: events delivered this loop turn, not yet fanned out ----------

    def add_to_turn(self, event: bytes) -> bool:
        """True for the turn's first event (the fan-out then lists the channel)."""
        first = not self.turn
        self.turn.append(event)
        return first

    def take_turn(self) -> list[bytes]:
        events = self.turn
        if events:
            self.turn = []
        return events

    # -- followers: every move flushes the turn first -----------------------

    def flush(self) -> None:
        """Hand this turn's events to the players aligned now."""
        self._flush(self)

    def align(self, session: Session) -> None:
        """`session` holds exactly the channel's position: the shared frames from now."""
        self._flush(self)
        self.tracking.discard(session)
        self.aligned.add(session)

    def track(self, session: Session) -> None:
        """`session` catches up through its own cursor: off the shared frames."""
        self._flush(self)
        self.aligned.discard(session)
        self.tracking.add(session)

    def remove(self, session: Session) -> None:
        """`session` no longer follows; what was queued before it left goes out."""
        self._flush(self)
        self.aligned.discard(session)
        self.tracking.discard(session)

    # -- state ----------------------------------------------------------------

    def load(self, markets: list[tuple[str, bytes]]) -> None:
        """Replace the state with a snapshot read; the ring restarts empty."""
        self.latest_by_market = dict(markets)
        self.recent.clear()

    def apply(self, market: str, event: bytes) -> None:
        """Record an event the cursor just delivered."""
        self.latest_by_market[market] = event
        self.recent.append(event)

    def snapshot(self) -> bytes:
        return protocol.snapshot(self.topic, self.epoch, self.seq, self.latest_by_market.values())

    def recent_after(self, seq: int) -> list[bytes] | None:
        """The events after `seq` from memory, or None if the ring starts later."""
        behind = self.seq - seq
        if behind <= 0:
            return []
        if behind > len(self.recent):
            return None
        return list(islice(self.recent, len(self.recent) - behind, None))
