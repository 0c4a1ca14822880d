"""What a player that cannot keep up is owed: the newest event of each market.

Odds are state, not a log: an event carries its market's whole state, so a
newer one supersedes every older one of the same market (PROTOCOL.md §1).
While a connection is over its high-water mark the session stops queueing
events and keeps here, per market, only the newest; when it drains, they go
out per topic in seq order, and the first event after any skipped seq is
marked `coalesced` (§5.3). Memory is bounded by the markets the player
follows, whatever the feed does.
"""

from __future__ import annotations

from gateway.protocol import mark_coalesced


class CoalescingOutbox:
    __slots__ = ("kept", "sent_seq", "superseded")

    def __init__(self) -> None:
        self.kept: dict[tuple[str, str], tuple[int, bytes]] = {}  # (topic, market) -> newest
        self.sent_seq: dict[str, int] = {}  # per topic, the last seq the player has or gets
        self.superseded = 0  # events dropped because a newer one of the market came

    def start(self, topic: str, seq: int) -> None:
        """Coalesce `topic` from here; the player holds (or is sent) up to `seq`."""
        self.sent_seq[topic] = seq

    def push(self, topic: str, market: str, seq: int, event: bytes) -> None:
        key = (topic, market)
        if key in self.kept:
            self.superseded += 1
        self.kept[key] = (seq, event)

    def forget(self, topic: str) -> None:
        """The player left the topic, or it was reset: nothing kept for it is owed."""
        self.sent_seq.pop(topic, None)
        for key in [k for k in self.kept if k[0] == topic]:
            del self.kept[key]

    def __len__(self) -> int:
        return len(self.kept)

    def drain(self) -> list[bytes]:
        """Everything kept, per topic in seq order, `coalesced` after each skip."""
        by_topic: dict[str, list[tuple[int, bytes]]] = {}
        for (topic, _market), item in self.kept.items():
            by_topic.setdefault(topic, []).append(item)
        self.kept = {}
        out: list[bytes] = []
        for topic, items in by_topic.items():
            items.sort()
            last = self.sent_seq.get(topic, 0)
            for seq, event in items:
                out.append(mark_coalesced(event) if seq != last + 1 else event)
                last = seq
            self.sent_seq[topic] = last
        return out
