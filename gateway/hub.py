"""Who follows which topic in this worker, and the fan-out of every event.

The hub owns the worker's topic channels. The first player of a topic makes
the worker SUBSCRIBE its Redis channel and load its state; the last one to
leave drops both, so the worker holds exactly one subscription per topic it
serves. Every event from Redis is parsed once here (for its epoch, seq and
market), checked against the channel's cursor, recorded, and its bytes
handed to each follower as they are.

When the channel's cursor sees a gap (pub/sub lost messages, or Redis came
back) the channel fills it from history before anything newer is delivered;
when history cannot fill it, or the epoch changed, every follower is told
`reset` and gets a fresh snapshot. A player never sees a silent gap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import orjson

from gateway import protocol
from gateway.broker import RedisBroker
from gateway.channel import Item, TopicChannel
from gateway.coalesce import CoalescingOutbox
from gateway.counters import WorkerCounters
from gateway.fanout import Fanout
from gateway.protocol import ResumePoint
from gateway.sequencer import SeqCursor, Verdict
from gateway.session import Session

log = logging.getLogger("oddsgate.hub")


def _parse(event: bytes) -> tuple[str, int, str, int]:
    obj = orjson.loads(event)
    return obj["epoch"], obj["seq"], obj["market"], obj["ts"]


class Hub:
    def __init__(
        self,
        fanout: Fanout | None = None,
        *,
        recent_capacity: int = 512,
        replay_max: int = 10_000,
        replay_chunk: int = 256,
        counters: WorkerCounters | None = None,
    ) -> None:
        self.channels: dict[str, TopicChannel] = {}
        self.broker: RedisBroker | None = None
        self.recent_capacity = recent_capacity
        self.replay_max = replay_max
        self.replay_chunk = replay_chunk
        self.counters = counters or WorkerCounters()
        self.fanout = fanout or Fanout(self.counters, max_batch=replay_chunk)
        self.fanout.after_run.append(self._observe_turn)
        # Fan-out latency (event ts -> frames written), observed per event at
        # the end of its turn when a sink (the fleet table) is attached.
        self.latency_sink: Callable[[int], None] | None = None
        self._turn_ts: list[int] = []
        self.pubsub_lag_ns = 0  # publish -> receipt of the last event from Redis
        self._tasks: set[asyncio.Task] = set()
        # Players over their high-water mark, taken off the fast path: their
        # events go to their CoalescingOutbox until they drain.
        self.pressured: set[Session] = set()
        self._pressure_pending: set[Session] = set()

    def attach_broker(self, broker: RedisBroker) -> None:
        self.broker = broker

    def _observe_turn(self) -> None:
        if not self._turn_ts:
            return
        stamps, self._turn_ts = self._turn_ts, []
        sink = self.latency_sink
        if sink is not None:
            now = time.time_ns()
            for ts in stamps:
                sink(now - ts)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the live path (called by the broker, never awaits) ---------------

    def on_message(self, topic: str, event: bytes) -> None:
        channel = self.channels.get(topic)
        if channel is None:
            return  # a message still in flight after the last player left
        self.counters.events_in += 1
        try:
            epoch, seq, market, ts = _parse(event)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.error("dropping a malformed event on %s: %.200r", topic, event)
            return
        self.pubsub_lag_ns = time.time_ns() - ts
        verdict = channel.cursor.offer(epoch, seq, (market, event))
        if verdict is Verdict.DELIVER:
            if self.latency_sink is not None:
                self._turn_ts.append(ts)
            self._fan_out(channel, epoch, seq, market, event)
        elif verdict is Verdict.GAP or verdict is Verdict.EPOCH:
            channel.cursor.begin_sync()
            channel.cursor.kept.append((epoch, seq, (market, event)))
            self._start_repair(channel)

    def _fan_out(self, channel: TopicChannel, epoch: str, seq: int, market: str,
                 event: bytes) -> None:
        channel.apply(market, event)
        if channel.aligned:
            self.fanout.channel_event(channel, event)
        if channel.tracking:
            self._deliver_tracking(channel, epoch, seq, market, event)

    def _deliver_tracking(self, channel: TopicChannel, epoch: str, seq: int, market: str,
                          event: bytes) -> None:
        """The slow path: players catching up, each through its own cursor."""
        topic = channel.topic
        caught_up = []
        for session in list(channel.tracking):
            verdict = session.deliver(topic, epoch, seq, event, market)
            if verdict is Verdict.DELIVER:
                self.counters.deliveries += 1
            if verdict is Verdict.GAP or verdict is Verdict.EPOCH:
                # The channel is contiguous, so only a cursor set ahead of it
                # by a resume can get here; bring that player back in line.
                self._reset_session(session, channel, "resync")
                continue
            cursor = session.cursors.get(topic)
            if cursor is not None and not cursor.syncing and cursor.seq == channel.seq:
                caught_up.append(session)
        for session in caught_up:
            self._align(session, channel)

    def _align(self, session: Session, channel: TopicChannel) -> None:
        """Move a player whose cursor stands at the channel's onto the fast path."""
        if session in self.pressured:
            return  # it stays on its cursor, coalescing, until it drains
        self.fanout.flush_channel(channel)
        channel.tracking.discard(session)
        channel.aligned.add(session)

    def _track(self, session: Session, channel: TopicChannel, cursor: SeqCursor[bytes]) -> None:
        """Put a player on the slow path with `cursor` (set at or ahead of the channel)."""
        self.fanout.flush_channel(channel)
        channel.aligned.discard(session)
        channel.tracking.add(session)
        session.cursors[channel.topic] = cursor

    # -- joining and leaving ----------------------------------------------

    async def open_channel(self, topic: str) -> TopicChannel:
        """The ready channel of `topic`, subscribing and loading it if new.

        The channel is held open for the caller until it calls `join` or
        `abandon`, so it cannot be dropped in between. Raises ConnectionError
        when Redis cannot be reached.
        """
        channel = self.channels.get(topic)
        if channel is None:
            channel = TopicChannel(topic, self.recent_capacity)
            self.channels[topic] = channel
            self._spawn(self._load(channel))
        channel.joining += 1
        try:
            await asyncio.shield(channel.ready)
        except BaseException:
            self.abandon(channel)
            raise
        return channel

    def take_open_channel(self, topic: str) -> TopicChannel | None:
        """`open_channel` without awaiting, for a channel already open and loaded."""
        channel = self.channels.get(topic)
        if channel is None or not channel.ready.done() or channel.ready.exception():
            return None
        channel.joining += 1
        return channel

    def abandon(self, channel: TopicChannel) -> None:
        """Give back a channel `open_channel` returned, without joining it."""
        channel.joining -= 1
        self._drop_if_unused(channel)

    async def _load(self, channel: TopicChannel) -> None:
        assert self.broker is not None
        try:
            await self.broker.subscribe(channel.topic)
            state = await self.broker.load_state(channel.topic)
        except Exception as exc:
            log.warning("cannot open %s: %s", channel.topic, exc)
            if self.channels.get(channel.topic) is channel:
                del self.channels[channel.topic]
                self.broker.unsubscribe(channel.topic)
            channel.ready.set_exception(ConnectionError(f"upstream unavailable: {exc}"))
            channel.ready.exception()  # retrieved: joiners see it through the shield
            return
        self._install(channel, state.epoch, state.seq, state.markets)
        channel.ready.set_result(None)
        self._drop_if_unused(channel)  # every joiner may have timed out meanwhile

    def _install(self, channel: TopicChannel, epoch: str, seq: int, markets: list[bytes],
                 reset_reason: str | None = None) -> None:
        """A fresh snapshot, plus the live events kept while it was read, becomes
        the channel's state.

        With `reset_reason` (a resync), every follower is told `reset` and gets
        a snapshot of that state.
        """
        parsed: list[tuple[str, bytes]] = []
        for event in markets:
            try:
                parsed.append((_parse(event)[2], event))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.error("skipping a malformed latest state of %s", channel.topic)
        channel.cursor.begin_sync()
        result = channel.cursor.complete_sync(epoch, seq, [])
        channel.load(parsed)
        # The cursor now stands past the live events kept during the read: they
        # join the state before any snapshot is built from it, or a snapshot
        # would name their seq without their prices and they would follow it
        # as repeats (Hardening, point 4).
        for market, event in result.deliver:
            channel.apply(market, event)
        if reset_reason is not None:
            self.fanout.flush_channel(channel)
            for session in list(channel.subscribers):
                self._reset_session(session, channel, reset_reason)
        if result.gap or result.epoch_changed:
            channel.cursor.begin_sync()
            self._start_repair(channel)  # inside a repair already: its loop goes on

    def join(self, session: Session, channel: TopicChannel, resume: ResumePoint | None) -> None:
        """Attach a player to a ready channel and send its snapshot or replay."""
        channel.joining -= 1
        if resume is None:
            self._send_snapshot(session, channel)
            return
        if resume.epoch != channel.epoch:
            self._reset_session(session, channel, "epoch")
            self.counters.resumes_reset += 1
            return
        if resume.seq <= channel.seq:
            events = channel.recent_after(resume.seq)
            if events is not None:
                self.fanout.flush_channel(channel)
                self._send_replay(session, events)
                self._attach_aligned(session, channel)
                self.counters.resumes_replayed += 1
                return
        # Behind the ring, or ahead of this worker: ask Redis, keeping live
        # events aside meanwhile.
        cursor: SeqCursor[bytes] = SeqCursor(channel.epoch, resume.seq, syncing=True)
        self._track(session, channel, cursor)
        self._spawn(self._replay_from_history(session, channel, cursor, resume))

    def _attach_aligned(self, session: Session, channel: TopicChannel) -> None:
        """The player holds exactly the channel's position: fast path from now on."""
        self.fanout.flush_channel(channel)
        session.cursors[channel.topic] = SeqCursor(channel.epoch, channel.seq)
        if session in self.pressured:
            session.outbox.start(channel.topic, channel.seq)
            channel.aligned.discard(session)
            channel.tracking.add(session)
            return
        channel.tracking.discard(session)
        channel.aligned.add(session)

    async def _replay_from_history(self, session: Session, channel: TopicChannel,
                                   cursor: SeqCursor[bytes], resume: ResumePoint) -> None:
        assert self.broker is not None
        try:
            history = await self.broker.read_since(channel.topic, resume.seq, self.replay_max)
        except Exception as exc:
            log.warning("replay read of %s failed: %s", channel.topic, exc)
            history = None
        if session.cursors.get(channel.topic) is not cursor:
            return  # the player left, or the channel reset it meanwhile
        if history is None or history.epoch != resume.epoch or history.events is None \
                or resume.seq > history.head:
            reason = "ahead" if history is not None and resume.seq > history.head else "window"
            self._reset_session(session, channel, reason)
            self.counters.resumes_reset += 1
            return
        read = [(resume.seq + 1 + i, e) for i, e in enumerate(history.events)]
        result = cursor.complete_sync(resume.epoch, resume.seq, read)
        if result.gap or result.epoch_changed:
            self._reset_session(session, channel, "resync")
            self.counters.resumes_reset += 1
            return
        self._send_replay(session, result.deliver)
        self.counters.resumes_replayed += 1
        if session in self.pressured:
            session.outbox.start(channel.topic, cursor.seq)
        if cursor.seq == channel.seq:
            self._align(session, channel)

    def leave(self, session: Session, topic: str) -> None:
        session.cursors.pop(topic, None)
        if session.acked is not None:
            session.acked.pop(topic, None)
        if session.outbox is not None:
            session.outbox.forget(topic)
        channel = self.channels.get(topic)
        if channel is not None:
            self.fanout.flush_channel(channel)  # what was queued before leaving goes out
            channel.aligned.discard(session)
            channel.tracking.discard(session)
            self._drop_if_unused(channel)

    def leave_all(self, session: Session) -> None:
        for topic in list(session.cursors):
            self.leave(session, topic)
        self.pressured.discard(session)
        self._pressure_pending.discard(session)
        session.coalescing = False

    # -- back-pressure ------------------------------------------------------

    def pressure_changed(self, session: Session) -> None:
        """A player's transport crossed a watermark; act at the end of this turn.

        Called from inside a transport write, so nothing is rearranged now.
        """
        if session not in self._pressure_pending:
            self._pressure_pending.add(session)
            asyncio.get_running_loop().call_soon(self._apply_pressure, session)

    def _apply_pressure(self, session: Session) -> None:
        self._pressure_pending.discard(session)
        if not session.open:
            self.pressured.discard(session)
            return
        if session.pressured:
            if session not in self.pressured:
                self._start_coalescing(session)
            return
        if session in self.pressured:
            self._catch_up(session)

    def _start_coalescing(self, session: Session) -> None:
        """Off the fast path: from the channel's position, newest per market only."""
        self.pressured.add(session)
        session.coalescing = True
        if session.outbox is None:
            session.outbox = CoalescingOutbox()
        for topic, cursor in list(session.cursors.items()):
            channel = self.channels.get(topic)
            if channel is None:
                continue
            if session in channel.aligned:
                self.fanout.flush_channel(channel)  # this turn's events still go as frames
                channel.aligned.discard(session)
                channel.tracking.add(session)
                cursor = SeqCursor(channel.epoch, channel.seq)
                session.cursors[topic] = cursor
            session.outbox.start(topic, cursor.seq)

    def _catch_up(self, session: Session) -> None:
        """Drained: send what was kept, in seq order per topic, then the fast path."""
        self.pressured.discard(session)
        session.coalescing = False
        outbox = session.outbox
        assert outbox is not None
        session.outbox = None  # kept only while coalescing: memory goes back
        events = outbox.drain()
        self.counters.coalesced += outbox.superseded
        self._send_replay(session, events)
        if session.pressured:  # the catch-up itself filled the buffer again
            self._start_coalescing(session)
            return
        for topic, cursor in list(session.cursors.items()):
            channel = self.channels.get(topic)
            if (channel is not None and session in channel.tracking and not cursor.syncing
                    and cursor.seq == channel.seq):
                self._align(session, channel)

    def _drop_if_unused(self, channel: TopicChannel) -> None:
        if channel.followed or channel.joining > 0 or not channel.ready.done():
            return
        if self.channels.get(channel.topic) is channel:
            del self.channels[channel.topic]
            if self.broker is not None:
                self.broker.unsubscribe(channel.topic)

    # -- frames to one player ---------------------------------------------

    def _send_snapshot(self, session: Session, channel: TopicChannel) -> None:
        self.fanout.flush_channel(channel)  # the snapshot already holds this turn's events
        session.send(channel.snapshot())
        self._attach_aligned(session, channel)
        self.counters.snapshots += 1

    def _reset_session(self, session: Session, channel: TopicChannel, reason: str) -> None:
        if session.outbox is not None:
            session.outbox.forget(channel.topic)
        session.send(protocol.reset(channel.topic, reason))
        self._send_snapshot(session, channel)

    def _send_replay(self, session: Session, events: list[bytes]) -> None:
        chunk = self.replay_chunk
        for i in range(0, len(events), chunk):
            part = events[i : i + chunk]
            session.send(part[0] if len(part) == 1 else protocol.batch(part))

    # -- repair: gaps, epochs, Redis reconnects ---------------------------

    def on_resubscribed(self) -> None:
        """Redis is back: every channel checks history for what pub/sub lost."""
        for channel in list(self.channels.values()):
            if channel.ready.done() and not channel.ready.exception():
                channel.cursor.begin_sync()
                self._start_repair(channel)

    def _start_repair(self, channel: TopicChannel) -> None:
        if not channel.repairing:
            channel.repairing = True
            self._spawn(self._repair(channel))

    async def _repair(self, channel: TopicChannel) -> None:
        assert self.broker is not None
        try:
            while channel.cursor.syncing and self.channels.get(channel.topic) is channel:
                try:
                    history = await self.broker.read_since(
                        channel.topic, channel.seq, self.replay_max
                    )
                except Exception as exc:
                    log.warning("gap fill of %s failed (%s); retrying", channel.topic, exc)
                    await asyncio.sleep(0.5)
                    continue
                if history.epoch != channel.epoch or history.events is None:
                    await self._resync(channel, "epoch" if history.epoch != channel.epoch
                                       else "gap")
                    continue
                read: list[tuple[int, Item]] = []
                for event in history.events:
                    _, seq, market, _ = _parse(event)
                    read.append((seq, (market, event)))
                result = channel.cursor.complete_sync(channel.epoch, channel.seq, read)
                if read:
                    self.counters.gaps_filled += 1
                self._deliver_merged(channel, result.deliver)
                if result.epoch_changed:
                    channel.cursor.begin_sync()
        finally:
            channel.repairing = False

    async def _resync(self, channel: TopicChannel, reason: str) -> None:
        """History cannot bridge the gap: a new snapshot, and every follower resets."""
        assert self.broker is not None
        log.warning("resetting %s (%s)", channel.topic, reason)
        try:
            state = await self.broker.load_state(channel.topic)
        except Exception as exc:
            log.warning("reload of %s failed (%s); retrying", channel.topic, exc)
            await asyncio.sleep(0.5)
            return
        self.counters.channel_resets += 1
        self._install(channel, state.epoch, state.seq, state.markets, reset_reason=reason)

    def _deliver_merged(self, channel: TopicChannel, items: list[Item]) -> None:
        """Fan out merged items; the cursor already stands at the last of them."""
        if not items:
            return
        end = channel.cursor.seq
        first = end - len(items) + 1
        epoch = channel.epoch
        for offset, (market, event) in enumerate(items):
            self._fan_out(channel, epoch, first + offset, market, event)
