"""The asyncio shell around the hub: it performs the hub's effects.

The hub (gateway/hub.py) decides; this runner talks to Redis through the
broker, waits, retries on a timer and feeds every result back to the hub as
its next input. It also lets a subscribe wait for a channel's first load
(`open_channel`), which is the one place a player's request awaits the hub.

Nothing here decides anything about a stream: what to read, what a result
means and who gets which frame are the hub's; so its tests drive the hub
directly and this file stays small.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from gateway.broker import RedisBroker
from gateway.channel import TopicChannel
from gateway.effects import (
    AtTurnEnd,
    CloseTopic,
    Effect,
    LagDeadline,
    LoadState,
    OpenTopic,
    ReadHistory,
    Resubscribe,
    RetryRepair,
)
from gateway.hub import Hub
from gateway.protocol import ResumePoint
from gateway.session import Session

log = logging.getLogger("oddsgate.hub")


class HubRunner:
    def __init__(self, hub: Hub, broker: RedisBroker | None = None) -> None:
        self.hub = hub
        self.broker: RedisBroker = broker  # type: ignore[assignment]  # attach_broker
        self._tasks: set[asyncio.Task] = set()
        # Joiners waiting for a channel's first load, by channel.
        self._loading: dict[TopicChannel, asyncio.Future[None]] = {}

    def attach_broker(self, broker: RedisBroker) -> None:
        """The broker is made after the runner, whose methods are its callbacks."""
        self.broker = broker

    # -- inputs from the broker --------------------------------------------

    def on_message(self, topic: str, event: bytes) -> None:
        effects = self.hub.on_message(topic, event)
        if effects:
            self.perform(effects)

    def on_resubscribed(self) -> None:
        self.perform(self.hub.on_resubscribed())

    # -- inputs from the worker ----------------------------------------------

    async def open_channel(self, topic: str) -> TopicChannel:
        """The ready channel of `topic`, subscribing and loading it if new.

        The channel is held for the caller until it calls `join` or
        `abandon`, so it cannot be dropped in between. Raises ConnectionError
        when Redis cannot be reached (and gives the channel back).
        """
        channel, effects = self.hub.hold(topic)
        self.perform(effects)
        if channel.ready:
            return channel
        waiter = self._loading.get(channel)
        if waiter is None:
            waiter = self._loading[channel] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.shield(waiter)
        except BaseException:
            self.abandon(channel)
            raise
        return channel

    def take_open_channel(self, topic: str) -> TopicChannel | None:
        """`open_channel` without awaiting, for a channel already open and loaded."""
        return self.hub.hold_ready(topic)

    def abandon(self, channel: TopicChannel) -> None:
        """Give back a channel `open_channel` returned, without joining it."""
        self.perform(self.hub.release(channel))

    def join(self, session: Session, channel: TopicChannel, resume: ResumePoint | None) -> None:
        self.perform(self.hub.join(session, channel, resume))

    def leave(self, session: Session, topic: str) -> None:
        self.perform(self.hub.leave(session, topic))

    def leave_all(self, session: Session) -> None:
        self.perform(self.hub.leave_all(session))

    def pressure_changed(self, session: Session) -> None:
        self.perform(self.hub.pressure_changed(session))

    async def audit(self, every_s: float) -> None:
        """Compare every channel's position with Redis's, every `every_s` (Hub.audited)."""
        while True:
            await asyncio.sleep(every_s)
            channels = self.hub.audit_targets()
            if not channels:
                continue
            try:
                heads = await self.broker.read_heads([c.topic for c in channels])
            except Exception as exc:  # Redis away: the reconnect path repairs instead
                log.warning("audit read failed: %s", exc)
                continue
            self.perform(self.hub.audited(
                (c, epoch, head) for c, (epoch, head) in zip(channels, heads, strict=True)))

    # -- effects --------------------------------------------------------------

    def perform(self, effects: Iterable[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, ReadHistory):
                self._spawn(self._read_history(effect))
            elif isinstance(effect, AtTurnEnd):
                asyncio.get_running_loop().call_soon(self._apply_pressure, effect.session)
            elif isinstance(effect, OpenTopic):
                self._spawn(self._open(effect.channel))
            elif isinstance(effect, CloseTopic):
                self.broker.unsubscribe(effect.topic)
            elif isinstance(effect, LoadState):
                self._spawn(self._reload(effect))
            elif isinstance(effect, RetryRepair):
                asyncio.get_running_loop().call_later(effect.after_s, self._repair_timer,
                                                      effect.channel)
            elif isinstance(effect, LagDeadline):
                asyncio.get_running_loop().call_later(effect.after_s, self._lag_expired, effect)
            elif isinstance(effect, Resubscribe):
                self.broker.resubscribe(effect.topic)
            else:  # pragma: no cover - a new effect without its runner
                raise TypeError(f"no runner for {effect!r}")

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _apply_pressure(self, session: Session) -> None:
        self.perform(self.hub.apply_pressure(session))

    def _lag_expired(self, held: LagDeadline) -> None:
        self.perform(self.hub.lag_expired(held))

    def _repair_timer(self, channel: TopicChannel) -> None:
        self.perform(self.hub.repair_timer(channel))

    async def _open(self, channel: TopicChannel) -> None:
        try:
            await self.broker.subscribe(channel.topic)
            state = await self.broker.load_state(channel.topic)
        except Exception as exc:
            effects = self.hub.load_failed(channel, exc)
            self._loaded(channel, ConnectionError(f"upstream unavailable: {exc}"))
        else:
            effects = self.hub.loaded(channel, state)
            self._loaded(channel, None)
        self.perform(effects)

    def _loaded(self, channel: TopicChannel, error: Exception | None) -> None:
        waiter = self._loading.pop(channel, None)
        if waiter is None or waiter.done():
            return
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)
            waiter.exception()  # retrieved: the joiners see it through their shields

    async def _read_history(self, read: ReadHistory) -> None:
        try:
            history = await self.broker.read_since(read.channel.topic, read.after, read.most)
        except Exception as exc:
            self.perform(self.hub.history_failed(read, exc))
        else:
            self.perform(self.hub.history_read(read, history))

    async def _reload(self, read: LoadState) -> None:
        try:
            state = await self.broker.load_state(read.channel.topic)
        except Exception as exc:
            self.perform(self.hub.resync_failed(read, exc))
        else:
            self.perform(self.hub.resync_loaded(read, state))
