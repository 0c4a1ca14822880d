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

The hub is a plain object: it never awaits, sleeps or schedules. Each input
(a live event, a read's result, a reconnect, a join, a leave, a timer)
returns the effects it needs (gateway/effects.py: open or close a topic,
read history, reload a state, retry later, act at the end of the turn), and
`gateway/hub_runner.py` performs them and feeds the results back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import orjson

from gateway import protocol
from gateway.broker import History, TopicState
from gateway.channel import Item, TopicChannel
from gateway.counters import WorkerCounters
from gateway.effects import (
    NO_EFFECTS,
    AtTurnEnd,
    CloseTopic,
    Effect,
    Effects,
    LagDeadline,
    LoadState,
    OpenTopic,
    ReadHistory,
    Replay,
    Resubscribe,
    RetryRepair,
)
from gateway.fanout import Fanout
from gateway.protocol import ResumePoint
from gateway.sequencer import SeqCursor, Verdict
from gateway.session import Session

log = logging.getLogger("oddsgate.hub")

RETRY_S = 0.5  # after a failed read: Redis is away, and its reconnect is on the same delay


def _parse(event: bytes) -> tuple[str, int, str, int]:
    """Epoch, seq, the key the latest state is kept by, ts.

    That key is an odds event's `market` or a stats event's `key` (PROTOCOL.md
    §12): everything downstream (coalescing, snapshots, resumes) is the same.
    """
    obj = orjson.loads(event)
    market = obj.get("market")
    if market is None:
        market = obj["key"]
    return obj["epoch"], obj["seq"], market, obj["ts"]


class Hub:
    def __init__(
        self,
        fanout: Fanout | None = None,
        *,
        recent_capacity: int = 512,
        replay_max: int = 10_000,
        replay_chunk: int = 256,
        counters: WorkerCounters | None = None,
        lag_wait_s: float = 0.0,
    ) -> None:
        self.channels: dict[str, TopicChannel] = {}
        # How long a resume ahead of what this region has published is held
        # for the region to catch up (PROTOCOL.md §8, `lag_wait_ms`); 0: reset
        # `ahead` at once.
        self.lag_wait_s = lag_wait_s
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
        # Players over their high-water mark, taken off the fast path: their
        # events go to their CoalescingOutbox until they drain.
        self.pressured: set[Session] = set()
        self._pressure_pending: set[Session] = set()
        # Channels found behind Redis at the last audit, with what Redis had then.
        self._suspects: dict[TopicChannel, tuple[str, int]] = {}

    def _observe_turn(self) -> None:
        if not self._turn_ts:
            return
        stamps, self._turn_ts = self._turn_ts, []
        sink = self.latency_sink
        if sink is not None:
            now = time.time_ns()
            for ts in stamps:
                sink(now - ts)

    # -- the live path (the broker's reader calls it per message) -----------

    def on_message(self, topic: str, event: bytes) -> Effects:
        channel = self.channels.get(topic)
        if channel is None:
            return NO_EFFECTS  # a message still in flight after the last player left
        self.counters.events_in += 1
        try:
            epoch, seq, market, ts = _parse(event)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.error("dropping a malformed event on %s: %.200r", topic, event,
                      extra={"topic": topic})
            return NO_EFFECTS
        self.pubsub_lag_ns = time.time_ns() - ts
        verdict = channel.cursor.offer(epoch, seq, (market, event))
        if verdict is Verdict.DELIVER:
            if self.latency_sink is not None:
                self._turn_ts.append(ts)
            self._fan_out(channel, epoch, seq, market, event)
        elif verdict is Verdict.GAP or verdict is Verdict.EPOCH:
            channel.cursor.begin_sync()
            channel.cursor.kept.append((epoch, seq, (market, event)))
            return self._start_repair(channel)
        return NO_EFFECTS

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
        channel.align(session)

    # -- opening and joining --------------------------------------------------

    def hold(self, topic: str) -> tuple[TopicChannel, Effects]:
        """The channel of `topic`, held open for a joiner until `join` or `release`.

        A new channel is opened (subscribed, then loaded); the joiner waits
        for `loaded` or `load_failed` before it may join.
        """
        channel = self.channels.get(topic)
        effects = NO_EFFECTS
        if channel is None:
            channel = TopicChannel(topic, self.recent_capacity, self.fanout.flush_channel)
            self.channels[topic] = channel
            effects = [OpenTopic(channel)]
        channel.joining += 1
        return channel, effects

    def hold_ready(self, topic: str) -> TopicChannel | None:
        """`hold` for a channel already open and loaded; None otherwise."""
        channel = self.channels.get(topic)
        if channel is None or not channel.ready:
            return None
        channel.joining += 1
        return channel

    def release(self, channel: TopicChannel) -> Effects:
        """Give back a channel `hold` returned, without joining it."""
        channel.joining -= 1
        return self._drop_if_unused(channel)

    def loaded(self, channel: TopicChannel, state: TopicState) -> Effects:
        """The subscribed channel's first state: it is ready for its joiners."""
        if channel.ready or self.channels.get(channel.topic) is not channel:
            return NO_EFFECTS
        self._install(channel, state)
        channel.ready = True
        effects: list[Effect] = []
        if channel.cursor.syncing:
            effects += self._start_repair(channel)
        effects += self._drop_if_unused(channel)  # every joiner may have timed out meanwhile
        return effects

    def load_failed(self, channel: TopicChannel, exc: BaseException) -> Effects:
        """The channel could not be opened: it goes, and its joiners are refused."""
        log.warning("cannot open %s: %s", channel.topic, exc, extra={"topic": channel.topic})
        if self.channels.get(channel.topic) is channel and not channel.ready:
            del self.channels[channel.topic]
            return [CloseTopic(channel.topic)]
        return NO_EFFECTS

    def _install(self, channel: TopicChannel, state: TopicState,
                 reset_reason: str | None = None) -> None:
        """A fresh snapshot, plus the live events kept while it was read, becomes
        the channel's state.

        With `reset_reason` (a resync), every follower is told `reset` and gets
        a snapshot of that state. Leaves the cursor syncing when kept events
        show a gap or another epoch still to be read.
        """
        parsed: list[tuple[str, bytes]] = []
        for event in state.markets:
            try:
                parsed.append((_parse(event)[2], event))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.error("skipping a malformed latest state of %s", channel.topic,
                          extra={"topic": channel.topic})
        channel.cursor.begin_sync()
        result = channel.cursor.complete_sync(state.epoch, state.seq, [])
        channel.load(parsed)
        # The cursor now stands past the live events kept during the read: they
        # join the state before any snapshot is built from it, or a snapshot
        # would name their seq without their prices and they would follow it
        # as repeats (Hardening, point 4).
        for market, event in result.deliver:
            channel.apply(market, event)
        if reset_reason is not None:
            channel.flush()
            for session in list(channel.subscribers):
                self._reset_session(session, channel, reset_reason)
        if result.gap or result.epoch_changed:
            channel.cursor.begin_sync()

    def join(self, session: Session, channel: TopicChannel, resume: ResumePoint | None
             ) -> Effects:
        """Attach a player to a ready channel and send its snapshot or replay."""
        channel.joining -= 1
        if resume is None:
            self._send_snapshot(session, channel)
            return NO_EFFECTS
        if resume.epoch != channel.epoch:
            self._reset_session(session, channel, "epoch")
            self.counters.resumes_reset += 1
            return NO_EFFECTS
        if resume.seq <= channel.seq:
            events = channel.recent_after(resume.seq)
            if events is not None:
                channel.flush()
                self._send_replay(session, events)
                self._attach_aligned(session, channel)
                self.counters.resumes_replayed += 1
                return NO_EFFECTS
        # Behind the ring, or ahead of this worker: ask Redis, keeping live
        # events aside meanwhile.
        cursor: SeqCursor[bytes] = SeqCursor(channel.epoch, resume.seq, syncing=True)
        channel.track(session)
        session.cursors[channel.topic] = cursor
        return [ReadHistory(channel, resume.seq, self.replay_max,
                            Replay(session, cursor, resume))]

    def _attach_aligned(self, session: Session, channel: TopicChannel) -> None:
        """The player holds exactly the channel's position: fast path from now on
        (track and align flush the turn first)."""
        session.cursors[channel.topic] = SeqCursor(channel.epoch, channel.seq)
        if session in self.pressured:
            session.outbox.start(channel.topic, channel.seq)
            channel.track(session)
            return
        channel.align(session)

    def _replayed(self, read: ReadHistory, history: History | None) -> Effects:
        """A resuming player's history read came back (None: it failed)."""
        replay = read.replay
        assert replay is not None
        session, channel, cursor, resume = replay.session, read.channel, replay.cursor, \
            replay.resume
        if session.cursors.get(channel.topic) is not cursor:
            return NO_EFFECTS  # the player left, or the channel reset it meanwhile
        if history is not None and history.epoch == resume.epoch \
                and resume.seq > history.head:
            return self._hold_ahead(session, channel, cursor, resume)
        if history is None or history.epoch != resume.epoch or history.events is None:
            self._reset_session(session, channel, "window")
            self.counters.resumes_reset += 1
            return NO_EFFECTS
        events = [(resume.seq + 1 + i, e) for i, e in enumerate(history.events)]
        result = cursor.complete_sync(resume.epoch, resume.seq, events)
        if result.gap or result.epoch_changed:
            self._reset_session(session, channel, "resync")
            self.counters.resumes_reset += 1
            return NO_EFFECTS
        self._send_replay(session, result.deliver)
        self.counters.resumes_replayed += 1
        if session in self.pressured:
            session.outbox.start(channel.topic, cursor.seq)
        if cursor.seq == channel.seq:
            self._align(session, channel)
        return NO_EFFECTS

    def _hold_ahead(self, session: Session, channel: TopicChannel, cursor: SeqCursor,
                    resume: ResumePoint) -> Effects:
        """A resume point this region has not published yet (PROTOCOL.md §8).

        The player holds every event up to `resume.seq` already (it came from
        another region, whose events are the same bytes), so nothing is sent
        until the region passes that point: the cursor stands there, events up
        to it are stale to it, and the first one after it goes out as a
        normal replay-then-live. `Hub.lag_expired` resets it `ahead` if the
        region has not got there within `lag_wait_s`.
        """
        if self.lag_wait_s <= 0:
            self._reset_session(session, channel, "ahead")
            self.counters.resumes_reset += 1
            return NO_EFFECTS
        result = cursor.complete_sync(resume.epoch, resume.seq, [])
        if result.gap or result.epoch_changed:  # live events past a hole: read again
            self._reset_session(session, channel, "resync")
            self.counters.resumes_reset += 1
            return NO_EFFECTS
        self.counters.resumes_held += 1
        self._send_replay(session, result.deliver)
        if session in self.pressured:
            session.outbox.start(channel.topic, cursor.seq)
        if cursor.seq == channel.seq:
            self._align(session, channel)
            return NO_EFFECTS
        return [LagDeadline(session, channel, cursor, resume.seq, self.lag_wait_s)]

    def lag_expired(self, held: LagDeadline) -> Effects:
        """A held resume's wait is over: reset it `ahead` if the region is still behind."""
        session, channel = held.session, held.channel
        if session.cursors.get(channel.topic) is not held.cursor or not session.open:
            return NO_EFFECTS  # it left, or was reset, meanwhile
        if self.channels.get(channel.topic) is not channel or channel.seq >= held.resume_seq:
            return NO_EFFECTS  # caught up (or the channel was replaced, which resets anyway)
        log.info("resume of %s at seq %d still ahead of this region (at %d) after %.1fs",
                 channel.topic, held.resume_seq, channel.seq, self.lag_wait_s)
        self._reset_session(session, channel, "ahead")
        self.counters.resumes_reset += 1
        return NO_EFFECTS

    # -- leaving ----------------------------------------------------------------

    def leave(self, session: Session, topic: str) -> Effects:
        session.cursors.pop(topic, None)
        if session.acked is not None:
            session.acked.pop(topic, None)
        if session.outbox is not None:
            session.outbox.forget(topic)
        channel = self.channels.get(topic)
        if channel is None:
            return NO_EFFECTS
        channel.remove(session)
        return self._drop_if_unused(channel)

    def leave_all(self, session: Session) -> Effects:
        effects: list[Effect] = []
        for topic in list(session.cursors):
            effects += self.leave(session, topic)
        self.pressured.discard(session)
        self._pressure_pending.discard(session)
        if session.coalescing:
            session.stop_coalescing()  # what it held goes with it
        return effects

    def _drop_if_unused(self, channel: TopicChannel) -> Effects:
        if channel.followed or channel.joining > 0 or not channel.ready:
            return NO_EFFECTS
        if self.channels.get(channel.topic) is not channel:
            return NO_EFFECTS
        del self.channels[channel.topic]
        return [CloseTopic(channel.topic)]

    # -- back-pressure ------------------------------------------------------

    def pressure_changed(self, session: Session) -> Effects:
        """A player's transport crossed a watermark; act at the end of this turn.

        Called from inside a transport write, so nothing is rearranged now.
        """
        if session in self._pressure_pending:
            return NO_EFFECTS
        self._pressure_pending.add(session)
        return [AtTurnEnd(session)]

    def apply_pressure(self, session: Session) -> Effects:
        self._pressure_pending.discard(session)
        if not session.open:
            self.pressured.discard(session)
            return NO_EFFECTS
        if session.pressured:
            if session not in self.pressured:
                self._start_coalescing(session)
            return NO_EFFECTS
        if session in self.pressured:
            self._catch_up(session)
        return NO_EFFECTS

    def _start_coalescing(self, session: Session) -> None:
        """Off the fast path: from the channel's position, newest per market only."""
        self.pressured.add(session)
        outbox = session.start_coalescing()
        for topic, cursor in list(session.cursors.items()):
            channel = self.channels.get(topic)
            if channel is None:
                continue
            if session in channel.aligned:
                channel.track(session)  # this turn's events still go as frames
                cursor = SeqCursor(channel.epoch, channel.seq)
                session.cursors[topic] = cursor
            outbox.start(topic, cursor.seq)

    def _catch_up(self, session: Session) -> None:
        """Drained: send what was kept, in seq order per topic, then the fast path."""
        self.pressured.discard(session)
        outbox = session.stop_coalescing()
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

    # -- frames to one player ---------------------------------------------

    def _send_snapshot(self, session: Session, channel: TopicChannel) -> None:
        channel.flush()  # the snapshot already holds this turn's events
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

    def on_resubscribed(self) -> Effects:
        """Redis is back: every channel checks history for what pub/sub lost."""
        effects: list[Effect] = []
        for channel in list(self.channels.values()):
            if channel.ready:
                channel.cursor.begin_sync()
                effects += self._start_repair(channel)
        return effects

    # -- the audit: subscriptions lost without notice ------------------------

    def audit_targets(self) -> list[TopicChannel]:
        """The channels whose position the audit compares with Redis's."""
        return [c for c in self.channels.values()
                if c.ready and not c.repairing and not c.cursor.syncing]

    def audited(self, heads: Iterable[tuple[TopicChannel, str | None, int]]) -> Effects:
        """Redis's (epoch, head) of each audited channel, read just now.

        Pub/sub loses events silently, and the seq check finds the loss only
        when a later event comes; a subscription lost without notice (a client
        library's resubscription that never happened, a shard that dropped it)
        brings no later event, and its players would keep stale prices. So: a
        channel found behind Redis is a suspect; if at the next audit it has
        still not reached what Redis had then, no event is on its way: it is
        repaired from history and subscribed again. An event merely in flight
        at the first read has long arrived by the second.
        """
        effects: list[Effect] = []
        suspects, self._suspects = self._suspects, {}
        for channel, epoch, head in heads:
            if self.channels.get(channel.topic) is not channel or not channel.ready \
                    or channel.repairing or channel.cursor.syncing or epoch is None:
                continue
            if epoch == channel.epoch and head <= channel.seq:
                continue
            earlier = suspects.get(channel)
            if earlier is not None and (channel.epoch != earlier[0] or channel.seq < earlier[1]):
                self.counters.silent_losses += 1
                log.warning("%s is behind Redis (%s at %d, Redis %s at %d) with no event "
                            "arriving: repairing and subscribing again", channel.topic,
                            channel.epoch, channel.seq, epoch, head,
                            extra={"topic": channel.topic})
                channel.cursor.begin_sync()
                effects += self._start_repair(channel)
                effects.append(Resubscribe(channel.topic))
            else:
                self._suspects[channel] = (epoch, head)
        return effects

    def _start_repair(self, channel: TopicChannel) -> Effects:
        if channel.repairing:
            return NO_EFFECTS  # the repair in flight goes on while the cursor syncs
        channel.repairing = True
        return self._continue_repair(channel)

    def _continue_repair(self, channel: TopicChannel) -> Effects:
        """The repair's next step: another read while the cursor syncs, else done."""
        if channel.cursor.syncing and self.channels.get(channel.topic) is channel:
            return [ReadHistory(channel, channel.seq, self.replay_max)]
        channel.repairing = False
        return NO_EFFECTS

    def history_read(self, read: ReadHistory, history: History) -> Effects:
        """A history read came back: a player's replay, or the channel's gap fill."""
        if read.replay is not None:
            return self._replayed(read, history)
        channel = read.channel
        if self.channels.get(channel.topic) is not channel or not channel.cursor.syncing:
            channel.repairing = False
            return NO_EFFECTS
        if history.epoch != channel.epoch or history.events is None:
            return [LoadState(channel, "epoch" if history.epoch != channel.epoch else "gap")]
        if history.head < channel.seq:
            # Redis went back in time within the epoch: it lost writes it had
            # acknowledged (a failover to a replica that was behind). Seqs past
            # its head will name other events; the players start from its state.
            return [LoadState(channel, "rewound")]
        events: list[tuple[int, Item]] = []
        for event in history.events:
            _, seq, market, _ = _parse(event)
            events.append((seq, (market, event)))
        result = channel.cursor.complete_sync(channel.epoch, channel.seq, events)
        if events:
            self.counters.gaps_filled += 1
        self._deliver_merged(channel, result.deliver)
        if result.epoch_changed:
            channel.cursor.begin_sync()
        return self._continue_repair(channel)

    def history_failed(self, read: ReadHistory, exc: BaseException) -> Effects:
        if read.replay is not None:
            log.warning("replay read of %s failed: %s", read.channel.topic, exc,
                        extra={"topic": read.channel.topic})
            return self._replayed(read, None)
        log.warning("gap fill of %s failed (%s); retrying", read.channel.topic, exc,
                    extra={"topic": read.channel.topic})
        return [RetryRepair(read.channel, RETRY_S)]

    def repair_timer(self, channel: TopicChannel) -> Effects:
        """The delay after a failed read is over: read again, if still needed."""
        return self._continue_repair(channel)

    def resync_loaded(self, read: LoadState, state: TopicState) -> Effects:
        """History could not bridge the gap: a new snapshot, and every follower resets."""
        channel = read.channel
        if self.channels.get(channel.topic) is not channel:
            channel.repairing = False
            return NO_EFFECTS
        log.warning("resetting %s (%s)", channel.topic, read.reason, extra={"topic": channel.topic})
        self.counters.channel_resets += 1
        self._install(channel, state, reset_reason=read.reason)
        return self._continue_repair(channel)

    def resync_failed(self, read: LoadState, exc: BaseException) -> Effects:
        log.warning("reload of %s failed (%s); retrying", read.channel.topic, exc,
                    extra={"topic": read.channel.topic})
        return [RetryRepair(read.channel, RETRY_S)]

    def _deliver_merged(self, channel: TopicChannel, items: list[Item]) -> None:
        """Fan out merged items; the cursor already stands at the last of them."""
        if not items:
            return
        end = channel.cursor.seq
        first = end - len(items) + 1
        epoch = channel.epoch
        for offset, (market, event) in enumerate(items):
            self._fan_out(channel, epoch, first + offset, market, event)
