"""Where a stream of one topic stands, and the merge of a read with live events.

Redis pub/sub delivers a topic's events in seq order but at most once, and a
history or snapshot read races with it. A `SeqCursor` is the one rule both a
worker's topic channel and a player's subscription use to turn that into an
ordered stream with no gap and no duplicate:

- live: an event is delivered only if its seq is the next one; an older seq
  is dropped (already delivered), a newer one is a gap the owner must fill;
- syncing: while a read (snapshot, replay, gap fill) is in flight, live
  events are kept aside; the read's result plus what was kept are merged by
  seq when it completes.

It never awaits and never touches I/O, so every interleaving is unit-tested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Generic, TypeVar

T = TypeVar("T")


class Verdict(IntEnum):
    DELIVER = 0  # the next seq: deliver it
    STALE = 1  # at or below the cursor: already delivered, drop
    KEPT = 2  # a read is in flight: kept until it completes
    GAP = 3  # seqs are missing before it: fill from history first
    EPOCH = 4  # another seq space: the owner must reset


@dataclass(slots=True)
class SyncResult(Generic[T]):
    deliver: list[T] = field(default_factory=list)
    gap: bool = False  # events are still missing after `deliver`
    epoch_changed: bool = False  # a kept event belongs to another epoch


class SeqCursor(Generic[T]):
    __slots__ = ("epoch", "kept", "seq", "syncing")

    def __init__(self, epoch: str | None = None, seq: int = 0, *, syncing: bool = False) -> None:
        self.epoch = epoch
        self.seq = seq  # the last seq delivered (or held by the client)
        self.syncing = syncing
        self.kept: list[tuple[str, int, T]] = []

    def offer(self, epoch: str, seq: int, item: T) -> Verdict:
        if self.syncing:
            self.kept.append((epoch, seq, item))
            return Verdict.KEPT
        if epoch != self.epoch:
            return Verdict.EPOCH
        if seq <= self.seq:
            return Verdict.STALE
        if seq == self.seq + 1:
            self.seq = seq
            return Verdict.DELIVER
        return Verdict.GAP

    def begin_sync(self) -> None:
        """Keep live events aside until `complete_sync`."""
        self.syncing = True

    def complete_sync(self, epoch: str, seq: int, read: list[tuple[int, T]]) -> SyncResult[T]:
        """Merge a read with the kept events; the cursor goes live.

        `epoch`/`seq` is where the read found the topic (a snapshot's seq, or
        the position a replay starts after); `read` holds the events after it
        in seq order. What is delivered is contiguous from `seq` + 1. If kept
        events leave a hole the read did not cover, `gap` is set and the
        cursor stands before the hole, with the rest kept for the next fill.
        """
        kept, self.kept = self.kept, []
        self.syncing = False
        self.epoch = epoch
        self.seq = seq
        result: SyncResult[T] = SyncResult()
        if any(e != epoch for e, _, _ in kept):
            result.epoch_changed = True
            kept = [k for k in kept if k[0] == epoch]
        by_seq: dict[int, T] = {s: item for s, item in read if s > seq}
        for _, s, item in kept:
            if s > seq:
                by_seq.setdefault(s, item)
        for s in sorted(by_seq):
            if s != self.seq + 1:
                result.gap = True
                self.syncing = True
                self.kept = [(epoch, k, by_seq[k]) for k in sorted(by_seq) if k >= s]
                break
            self.seq = s
            result.deliver.append(by_seq[s])
        return result
