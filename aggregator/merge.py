"""One input order out of many providers' streams, the same in every region.

Each region holds its own copy of every provider's stream (docs/aggregator.md,
"One input order in every region"), and the copies arrive at their own pace:
in one region provider A's copy runs ahead of B's, in another the other way
round. The `Merger` turns those streams into one sequence that does not
depend on that pace: every message in the order of its key
`(pts, provider, pseq)`, the *canonical order*.

The watermark changes WHEN output is released, never WHAT is released or
in which order, unless a message is late (below).
A provider's pts never goes down, so once provider P has sent a message (or
a heartbeat) at `pts`, nothing P sends later sorts before `pts`. The
watermark is the minimum of those latest pts over the providers being waited
for, and `release()` hands out, sorted, every buffered message with
`pts < watermark`: nothing that sorts before one of them can still come.
Whatever the arrival interleaving, the released messages are therefore a
prefix of the canonical order, and each `release()` extends that prefix; a
region whose copy of one provider lags only releases later, the same
messages in the same order. (`<` and not `<=`: a provider may send several
messages with one pts, so a message at exactly the watermark could still be
followed by one of a provider whose name sorts first.)

The one exception is `exclude`. The asyncio shell excludes a provider that
has been silent for too long in wall-clock time, so that one dead feed does
not stop every price; from then on that provider no longer holds the
watermark. That decision depends on the region's own clock and copies, so it
may differ between regions, and it is safe only as long as the excluded
provider's next message does not sort before what was already released. One
that does is LATE: it is dropped and counted, and `diverged` becomes true,
because a region that received it in time released it in its place and this
region's output may now differ. The shell fail-stops on `diverged` and the
region rebuilds from its input log. An excluded provider is readmitted by
its next new message and holds the watermark again from then on.

Providers are fixed at construction, the configured set, so that one which
never spoke holds the watermark (nothing is released) until it speaks or is
excluded: a region that starts before a provider's copy arrives must not
release a prefix that provider's messages belong in.

`snapshot()` is what a checkpoint needs: per provider the last released (or
dropped) pseq and its pts, exclusions, the released watermark. After
`Merger.restore(snapshot)` the shell re-reads each provider's copy after
that pseq, offers it again, and the merge continues exactly where it was;
messages it had buffered but not released are simply read again.

Plain object: no asyncio, no Redis, no clock.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from aggregator.inputs import ProviderMessage

SNAPSHOT_VERSION = 1


class MergeError(Exception):
    """A provider stream that breaks its contract; the merge state is unchanged."""


class UnknownProvider(MergeError):
    """A message or an exclusion for a provider outside the configured set."""


class InputGap(MergeError):
    """A provider's copy skipped a pseq: the copy is broken and needs a backfill."""

    def __init__(self, provider: str, expected: int, got: int) -> None:
        super().__init__(f"provider {provider!r}: expected pseq {expected}, got {got} "
                         f"({got - expected} missing; the copy needs a backfill)")
        self.provider = provider
        self.expected = expected
        self.got = got


class InputDisorder(MergeError):
    """A provider's pts went down: its adapter broke the non-decreasing pts rule."""

    def __init__(self, provider: str, pseq: int, pts: int, latest_pts: int) -> None:
        super().__init__(f"provider {provider!r}: pseq {pseq} has pts {pts}, below its "
                         f"previous pts {latest_pts}")
        self.provider = provider
        self.pseq = pseq


@dataclass(slots=True)
class _Cursor:
    """Where one provider's stream stands in this merge."""

    taken_pseq: int = 0  # the last pseq accepted (buffered or dropped as late)
    latest_pts: int | None = None  # pts of that message; None until the provider speaks
    released_pseq: int = 0  # the last pseq released or dropped as late
    released_pts: int | None = None
    excluded_at: int | None = None  # taken_pseq when excluded; None while waited for
    late: int = 0
    duplicates: int = 0


class Merger:
    """The deterministic merge of per-provider ordered streams (see the module docstring)."""

    def __init__(self, providers: Iterable[str]) -> None:
        names = sorted(set(providers))
        if not names:
            raise ValueError("a merge needs at least one provider")
        self._cursors: dict[str, _Cursor] = {name: _Cursor() for name in names}
        self._heap: list[tuple[int, str, int, ProviderMessage]] = []
        self._released_watermark: int | None = None
        self.diverged = False

    # -- input ----------------------------------------------------------------------

    def offer(self, msg: ProviderMessage) -> bool:
        """Take the provider's next message; False for a duplicate (pseq already taken).

        True means the message was new and the provider's position moved on:
        it is buffered until released, or, if LATE (pts below the released
        watermark), dropped, counted and `diverged` set. Raises `InputGap`
        when pseq skips ahead, `InputDisorder` when pts goes down and
        `UnknownProvider` for a provider outside the set; none changes state.
        """
        cursor = self._cursor(msg.provider)
        if msg.pseq <= cursor.taken_pseq:
            cursor.duplicates += 1
            return False
        if msg.pseq != cursor.taken_pseq + 1:
            raise InputGap(msg.provider, cursor.taken_pseq + 1, msg.pseq)
        if cursor.latest_pts is not None and msg.pts < cursor.latest_pts:
            raise InputDisorder(msg.provider, msg.pseq, msg.pts, cursor.latest_pts)
        cursor.taken_pseq = msg.pseq
        cursor.latest_pts = msg.pts
        if cursor.excluded_at is not None and msg.pseq > cursor.excluded_at:
            cursor.excluded_at = None  # back: it holds the watermark again
        if self._released_watermark is not None and msg.pts < self._released_watermark:
            # Everything before this message's place is already out.
            cursor.late += 1
            cursor.released_pseq = msg.pseq
            cursor.released_pts = msg.pts
            self.diverged = True
            return True
        heapq.heappush(self._heap, (msg.pts, msg.provider, msg.pseq, msg))
        return True

    def exclude(self, provider: str) -> None:
        """Stop waiting for `provider` until its next new message (the shell's wall-clock call)."""
        cursor = self._cursor(provider)
        if cursor.excluded_at is None:
            cursor.excluded_at = cursor.taken_pseq

    # -- output ---------------------------------------------------------------------

    @property
    def watermark(self) -> int | None:
        """The least latest pts of the providers waited for; None while one never spoke."""
        lowest: int | None = None
        for cursor in self._cursors.values():
            if cursor.excluded_at is not None:
                continue
            if cursor.latest_pts is None:
                return None  # a provider that never spoke: any message may still be its
            if lowest is None or cursor.latest_pts < lowest:
                lowest = cursor.latest_pts
        return lowest  # None when all are excluded: nobody to wait for, no safe point

    @property
    def released_watermark(self) -> int | None:
        """Everything released so far has pts below this; a new message below it is late."""
        return self._released_watermark

    def release(self) -> list[ProviderMessage]:
        """Every buffered message with pts below the watermark, in (pts, provider, pseq) order.

        Heartbeats included: the consumer's data time moves with them. When
        every provider is excluded nothing is released: with no provider to
        wait for there is no safe point, and the output pauses until one
        comes back.
        """
        watermark = self.watermark
        if watermark is None:
            return []
        if self._released_watermark is not None and watermark <= self._released_watermark:
            return []  # a readmitted provider lags: wait until it passes the old mark
        self._released_watermark = watermark
        heap = self._heap
        out: list[ProviderMessage] = []
        while heap and heap[0][0] < watermark:
            msg = heapq.heappop(heap)[3]
            cursor = self._cursors[msg.provider]
            cursor.released_pseq = msg.pseq
            cursor.released_pts = msg.pts
            out.append(msg)
        return out

    # -- introspection --------------------------------------------------------------

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(self._cursors)

    @property
    def excluded(self) -> tuple[str, ...]:
        """The providers not waited for now, sorted."""
        return tuple(n for n, c in self._cursors.items() if c.excluded_at is not None)

    @property
    def late(self) -> dict[str, int]:
        """Late messages dropped, per provider."""
        return {name: c.late for name, c in self._cursors.items()}

    @property
    def duplicates(self) -> dict[str, int]:
        """Duplicate messages ignored, per provider (re-reads after a restart count here)."""
        return {name: c.duplicates for name, c in self._cursors.items()}

    @property
    def positions(self) -> dict[str, int]:
        """Per provider, the last pseq released or dropped: re-read its copy after it."""
        return {name: c.released_pseq for name, c in self._cursors.items()}

    @property
    def taken(self) -> dict[str, int]:
        """Per provider, the last pseq accepted: its copy is read up to here."""
        return {name: c.taken_pseq for name, c in self._cursors.items()}

    @property
    def buffered(self) -> int:
        return len(self._heap)

    # -- checkpoints ----------------------------------------------------------------

    def snapshot(self) -> dict:
        """A JSON-serialisable checkpoint of what was released (buffered messages are not in it).

        An excluded provider keeps its exclusion point as the pseq it had
        been read to: re-reading messages it had sent before it was excluded
        must not readmit it, or the restored merge would wait where the
        original did not.
        """
        return {
            "version": SNAPSHOT_VERSION,
            "released_watermark": self._released_watermark,
            "diverged": self.diverged,
            "providers": {
                name: {
                    "pseq": c.released_pseq,
                    "pts": c.released_pts,
                    "excluded_at": c.excluded_at,
                    "late": c.late,
                }
                for name, c in self._cursors.items()
            },
        }

    @classmethod
    def restore(cls, snapshot: dict) -> Merger:
        """The merge as it stood at `snapshot`; offer each provider's copy after `positions`."""
        if not isinstance(snapshot, dict) or snapshot.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"merge snapshot: expected version {SNAPSHOT_VERSION}")
        providers = snapshot.get("providers")
        if not isinstance(providers, dict) or not providers:
            raise ValueError("merge snapshot: no providers")
        merger = cls(providers)
        watermark = snapshot.get("released_watermark")
        if watermark is not None and type(watermark) is not int:
            raise ValueError("merge snapshot: released_watermark must be an integer or null")
        merger._released_watermark = watermark
        merger.diverged = snapshot.get("diverged") is True
        for name, state in providers.items():
            pseq, pts = state.get("pseq"), state.get("pts")
            excluded_at, late = state.get("excluded_at"), state.get("late", 0)
            if type(pseq) is not int or pseq < 0 or (pts is None) != (pseq == 0):
                raise ValueError(f"merge snapshot: provider {name!r} has a bad position")
            if pts is not None and type(pts) is not int:
                raise ValueError(f"merge snapshot: provider {name!r} has a bad pts")
            if excluded_at is not None and (type(excluded_at) is not int or excluded_at < pseq):
                raise ValueError(f"merge snapshot: provider {name!r} has a bad exclusion")
            cursor = merger._cursors[name]
            cursor.taken_pseq = cursor.released_pseq = pseq
            cursor.latest_pts = cursor.released_pts = pts
            cursor.excluded_at = excluded_at
            cursor.late = late if type(late) is int else 0
        return merger

    def _cursor(self, provider: str) -> _Cursor:
        cursor = self._cursors.get(provider)
        if cursor is None:
            raise UnknownProvider(f"provider {provider!r} is not one of {sorted(self._cursors)}")
        return cursor
