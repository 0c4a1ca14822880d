"""The end of a loop turn: every event of the turn leaves, once per player.

Most players follow a topic in line with the worker's own stream of it
(`TopicChannel.aligned`): for them a topic's events of one turn are the same
bytes, so they are joined into a payload and framed once, and that one
frame object is written to each of them. Per player and per turn the work is
a few attribute writes and one transport write; the kernel's write is the
floor. Players not in line (a replay in flight, a resume ahead of this
worker) take the slow path through their own cursors.

Events reach this module as the Redis reader parses them; `run` is called
once at the end of the turn (after every message of the socket read), so
each player gets one frame per turn however many events came.

The writes of one run go out `slice` players at a time, one loop iteration
each: a hot event followed by 6,000 players is ~70 ms of sends here, and a
subscribe, a ping or HAProxy's health check arriving meanwhile would wait
all of it. Order holds however the slices interleave with what comes next:
a player's pending output is only ever written by its own `flush` (a control
frame flushes it first), and events of a later run that reach a player still
waiting for its slice join its pending output behind the older ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway import protocol
from gateway.counters import WorkerCounters
from gateway.session import Session
from gateway.wire import text_frame

if TYPE_CHECKING:
    from gateway.channel import TopicChannel
    from gateway.session import Chunk


class Fanout:
    def __init__(self, counters: WorkerCounters, *, max_batch: int = 256,
                 slice: int = 0) -> None:
        self.counters = counters
        self.max_batch = max_batch
        self.slice = slice  # players written per loop iteration; 0: all at once
        self._channels: list[TopicChannel] = []
        self._sessions: list[Session] = []
        self._scheduled = False
        self.after_run: list[Callable[[], None]] = []  # called once every frame is written

    def _schedule_run(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.run)

    def channel_event(self, channel: TopicChannel, event: bytes) -> None:
        """An event the channel just delivered, for its aligned players."""
        if channel.add_to_turn(event):
            self._channels.append(channel)
            self._schedule_run()

    def schedule(self, session: Session) -> None:
        """A session with slow-path events to write this turn."""
        self._sessions.append(session)
        self._schedule_run()

    def chunks(self, events: list[bytes]) -> list[Chunk]:
        step = self.max_batch
        out = []
        for i in range(0, len(events), step):
            part = events[i : i + step]
            payload = part[0] if len(part) == 1 else protocol.batch(part)
            out.append((payload, text_frame(payload), len(part)))
        return out

    def flush_channel(self, channel: TopicChannel) -> None:
        """Hand the channel's turn to its aligned players now.

        Called before anyone joins or leaves `aligned`, so a player never gets
        an event from before its snapshot, nor misses one from before it left.
        """
        events = channel.take_turn()
        if not events:
            return
        aligned = channel.aligned
        if not aligned:
            return
        chunks = self.chunks(events)
        self.counters.deliveries += len(events) * len(aligned)
        Session.add_turn(aligned, chunks, events, self._sessions)

    def run(self) -> None:
        self._scheduled = False
        channels, self._channels = self._channels, []
        for channel in channels:
            self.flush_channel(channel)
        sessions, self._sessions = self._sessions, []
        self._write(sessions, 0)

    def _write(self, sessions: list[Session], start: int) -> None:
        """Flush `sessions[start:]`, a slice per loop iteration."""
        end = len(sessions) if not self.slice else min(len(sessions), start + self.slice)
        for i in range(start, end):
            session = sessions[i]
            if session.scheduled:  # else flushed already, by a control frame or a newer run
                session.flush()
        if end < len(sessions):
            asyncio.get_running_loop().call_soon(self._write, sessions, end)
            return
        for callback in self.after_run:
            callback()

