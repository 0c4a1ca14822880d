"""What the hub asks its runner to do: the hub decides, the runner acts.

The hub (gateway/hub.py) never awaits, sleeps or schedules: every input it
takes (a live event, a read's result, a Redis reconnect, a join, a leave, a
timer) returns the effects below, and the runner (gateway/hub_runner.py)
performs them, feeding each result back into the hub as a new input. So the
hub's decisions are plain method calls a test can drive through any
interleaving (tests/test_hub_properties.py), with Redis played by the test.

Effects name the channel object, not only its topic: a channel can be
dropped and a new one made for the same topic while a read is in flight,
and the hub must recognise the answer to a read of a channel that is gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from gateway.channel import TopicChannel
    from gateway.protocol import ResumePoint
    from gateway.sequencer import SeqCursor
    from gateway.session import Session


@dataclass(frozen=True, slots=True)
class OpenTopic:
    """Subscribe the channel's Redis channel, then load its state.

    Answered by `Hub.loaded` or `Hub.load_failed`."""

    channel: TopicChannel


@dataclass(frozen=True, slots=True)
class CloseTopic:
    """Unsubscribe the topic's Redis channel: its last follower left."""

    topic: str


@dataclass(frozen=True, slots=True)
class Replay:
    """A player resuming from further back than the channel's memory: whose read it is."""

    session: Session
    cursor: SeqCursor[bytes]
    resume: ResumePoint


@dataclass(frozen=True, slots=True)
class ReadHistory:
    """Every event of the channel's topic after `after`, if history holds them all.

    For the channel itself (a gap to fill) or, with `replay`, for one player.
    Answered by `Hub.history_read` or `Hub.history_failed`."""

    channel: TopicChannel
    after: int
    most: int
    replay: Replay | None = None


@dataclass(frozen=True, slots=True)
class LoadState:
    """Reload the topic's state: history cannot bridge the channel's gap.

    Answered by `Hub.resync_loaded` or `Hub.resync_failed`."""

    channel: TopicChannel
    reason: str


@dataclass(frozen=True, slots=True)
class RetryRepair:
    """After `after_s`, call `Hub.repair_timer(channel)` (a read failed: Redis is away)."""

    channel: TopicChannel
    after_s: float


@dataclass(frozen=True, slots=True)
class LagDeadline:
    """After `after_s`, call `Hub.lag_expired(self)`: a resume ahead of this region
    is held that long for the region to publish its point (PROTOCOL.md §8)."""

    session: Session
    channel: TopicChannel
    cursor: SeqCursor
    resume_seq: int
    after_s: float


@dataclass(frozen=True, slots=True)
class AtTurnEnd:
    """At the end of this loop turn, call `Hub.apply_pressure(session)`.

    A watermark is crossed inside a transport write, in the middle of a
    fan-out: nothing may be rearranged until that write's turn is over."""

    session: Session


@dataclass(frozen=True, slots=True)
class Resubscribe:
    """Subscribe the topic again: the audit found it silent while Redis moved on."""

    topic: str


Effect = Union[OpenTopic, CloseTopic, ReadHistory, LoadState, RetryRepair, LagDeadline,  # noqa: UP007
               AtTurnEnd, Resubscribe]
Effects = Sequence[Effect]
NO_EFFECTS: Effects = ()  # the common answer, allocated once
